"""Where training batches come from: an array held on the device, or HDF5 read per batch.

Both follow the official loader: every epoch is one uniform shuffle of the
whole training set (a permutation drawn from ``(seed, epoch)`` only), cut into
batches of ``batch_size`` videos, **the last one partial** (no ``drop_last``).
Each batch's indices are sorted, so both sources give the same batches in
the same row order and a streamed run trains exactly as an in-memory one.

* :class:`ResidentBatches` holds the whole array on the training device (host
  RAM, or GPU memory) in the compute dtype and gathers each batch there.
* :class:`StreamingBatches` reads each batch's rows from the HDF5 files (one
  sorted point selection per file) in a background thread, a few batches
  ahead. Memory is bounded by those few batches, not by the dataset, so a
  168 GB training set trains in a few GB of RAM.

With several processes (DDP) every global batch keeps its size and is split
into contiguous shares (:func:`rank_share`), as the official code's
``nn.DataParallel`` splits a batch across GPUs: shares differ by at most one
video, trailing ones may be empty, and every video of the epoch is seen once
whatever the world size. ``conmh.train`` pads the shares to equal size for the
all-gather of the codes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from .features import FeatureFiles


def epoch_batches(n: int, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
    """The global batches of one epoch: sorted index arrays, the last one possibly partial."""
    order = np.random.default_rng([seed, epoch, 0x10AD]).permutation(n)
    return [np.sort(order[start : start + batch_size]) for start in range(0, n, batch_size)]


def rank_share(batch: int, rank: int, world: int) -> slice:
    """The positions of a global batch of ``batch`` videos that ``rank`` of ``world`` trains on.

    Contiguous chunks of ``ceil(batch / world)`` videos, the last ones shorter or
    empty: how ``torch.chunk`` (and so ``nn.DataParallel``) splits a batch.
    """
    size = -(-batch // world)
    return slice(min(rank * size, batch), min((rank + 1) * size, batch))


class ResidentBatches:
    """The whole array on ``device`` in ``dtype``; batches are gathered there."""

    def __init__(
        self,
        feats: np.ndarray | FeatureFiles,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        block_rows: int = 1024,
    ) -> None:
        if isinstance(feats, np.ndarray):
            self.n, self.frames, self.dim = feats.shape
        else:
            self.n, self.frames, self.dim = feats.n, feats.frames, feats.dim
        self.device = device
        if isinstance(feats, np.ndarray) and device.type == "cpu" and dtype == torch.float32:
            self.array = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))  # no copy
            return
        # Fill block by block, so host memory holds one converted block at a time.
        self.array = torch.empty((self.n, self.frames, self.dim), dtype=dtype, device=device)
        for start in range(0, self.n, block_rows):
            stop = min(self.n, start + block_rows)
            block = feats[start:stop] if isinstance(feats, np.ndarray) else feats.read(start, stop)
            self.array[start:stop] = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device, dtype)

    def epoch(self, seed: int, epoch: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        for idx in epoch_batches(self.n, seed, epoch, batch_size):
            yield self.array[torch.from_numpy(idx[rank_share(len(idx), rank, world)]).to(self.device)]


class StreamingBatches:
    """Each batch read from ``feats`` (HDF5 files, or an array) by a background thread.

    Yields float32 CPU tensors; the training loop moves them to the device in
    the compute dtype. Peak memory is about ``prefetch + 2`` batches (queued,
    being read, in training); one read ahead suffices while reading outruns training.
    """

    def __init__(self, feats: FeatureFiles | np.ndarray, prefetch: int = 1) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be positive")
        self.feats = feats
        self.n, self.frames, self.dim = (
            feats.shape if isinstance(feats, np.ndarray) else (feats.n, feats.frames, feats.dim)
        )
        self.prefetch = prefetch

    def _read(self, idx: np.ndarray) -> np.ndarray:
        if isinstance(self.feats, np.ndarray):
            return np.ascontiguousarray(self.feats[idx], dtype=np.float32)
        return self.feats.take(idx)

    def epoch(self, seed: int, epoch: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        plan = [idx[rank_share(len(idx), rank, world)] for idx in epoch_batches(self.n, seed, epoch, batch_size)]
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for idx in plan:
                    if stop.is_set():
                        return
                    q.put(self._read(idx))
                q.put(None)
            except BaseException as exc:  # hand read errors to the consumer
                q.put(exc)

        thread = threading.Thread(target=work, name="conmh-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield torch.from_numpy(item)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
