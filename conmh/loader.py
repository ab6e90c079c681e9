"""Where training batches come from: resident arrays or HDF5 streamed in blocks.

* :class:`ResidentBatches` holds the whole training array on the training
  device (host RAM, or GPU memory in bf16 on CUDA) and gathers random batches.
* :class:`StreamingBatches` reads the HDF5 files in contiguous blocks, in a
  random block order, through a shuffle buffer of a few blocks, with a
  background thread reading ahead. Memory is bounded by the buffer, not by the
  dataset, so a 168 GB training set trains in a few GB of RAM.

Both give each epoch's batches as a function of ``(seed, epoch)`` only, so a
resumed run sees exactly the batches an uninterrupted one would. With several
processes (DDP) each rank yields its own share of every global batch.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from .data import FeatureFiles

# Batches drawn per epoch never include a trailing partial global batch: the
# contrastive loss wants its full set of negatives (unless the set is tiny).


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x10AD])


class ResidentBatches:
    """The whole array on ``device``; batch ``i`` of an epoch is a slice of one permutation."""

    def __init__(self, feats: np.ndarray | FeatureFiles, device: torch.device, dtype: torch.dtype = torch.float32,
                 block_rows: int = 1024) -> None:
        if isinstance(feats, np.ndarray):
            self.n, self.frames, self.dim = feats.shape
            self.array = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(device, dtype)
        else:
            self.n, self.frames, self.dim = feats.n, feats.frames, feats.dim
            # Fill block by block, so host memory holds one block at a time.
            self.array = torch.empty((self.n, self.frames, self.dim), dtype=dtype, device=device)
            for start, block in feats.iter_blocks(block_rows):
                self.array[start:start + len(block)] = torch.from_numpy(block).to(device, dtype)
        self.device = device

    def epoch(self, seed: int, epoch: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        order = torch.from_numpy(_rng(seed, epoch).permutation(self.n))
        n_batches = max(1, self.n // batch_size)
        for i in range(n_batches):
            idx = order[i * batch_size:(i + 1) * batch_size] if self.n >= batch_size else order
            idx = idx[: len(idx) - len(idx) % world]  # equal shares: DDP gathers equal-sized codes
            yield self.array[idx[rank::world].to(self.device)]


class StreamingBatches:
    """Random batches from HDF5 with bounded memory.

    An epoch shuffles the list of blocks (``block_rows`` contiguous videos
    each), deals them to the ranks, and streams each rank's blocks in groups of
    ``buffer_blocks``: a group's rows (plus the rows left over from the last
    group) are shuffled and cut into batches. Peak memory is about
    ``(buffer_blocks + prefetch) * block_rows`` videos.
    """

    def __init__(self, feats: FeatureFiles, block_rows: int = 256, buffer_blocks: int = 8, prefetch: int = 2) -> None:
        if block_rows < 1 or buffer_blocks < 1 or prefetch < 1:
            raise ValueError("block_rows, buffer_blocks and prefetch must be positive")
        self.feats = feats
        self.n, self.frames, self.dim = feats.n, feats.frames, feats.dim
        self.block_rows, self.buffer_blocks, self.prefetch = block_rows, buffer_blocks, prefetch
        self.starts = np.arange(0, self.n, block_rows)

    def _block_plan(self, seed: int, epoch: int, world: int) -> tuple[np.random.Generator, list[np.ndarray]]:
        rng = _rng(seed, epoch)
        order = self.starts[rng.permutation(len(self.starts))]
        return rng, [order[r::world] for r in range(world)]

    def _rows(self, starts: np.ndarray) -> int:
        return int(sum(min(self.block_rows, self.n - s) for s in starts))

    def _read_ahead(self, starts: np.ndarray) -> Iterator[np.ndarray]:
        """Blocks in ``starts`` order, read by a background thread up to ``prefetch`` ahead."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for s in starts:
                    if stop.is_set():
                        return
                    q.put(self.feats.read(int(s), int(min(self.n, s + self.block_rows))))
                q.put(None)
            except BaseException as exc:  # hand read errors to the consumer
                q.put(exc)

        thread = threading.Thread(target=work, name="conmh-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def epoch(self, seed: int, epoch: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        rng, plans = self._block_plan(seed, epoch, world)
        local = max(1, batch_size // world)
        # Every rank must take the same number of steps: the smallest share decides.
        steps = min(self._rows(p) for p in plans) // local
        if steps == 0:  # fewer videos than one batch: one batch of what there is
            steps, local = 1, min(self._rows(p) for p in plans)
        # Draw this rank's buffer permutations from a per-rank stream, so ranks differ.
        rank_rng = np.random.default_rng([int(rng.integers(1 << 62)), rank])
        # One preallocated buffer: blocks are copied in as they arrive; after a
        # shuffle the rows left over (fewer than a batch) move to its front.
        pool = np.empty((self.buffer_blocks * self.block_rows + local, self.frames, self.dim), dtype=np.float32)
        filled = blocks_in = done = 0
        blocks = self._read_ahead(plans[rank])
        try:
            for last, block in _mark_last(blocks):
                pool[filled:filled + len(block)] = block
                filled += len(block)
                blocks_in += 1
                if blocks_in < self.buffer_blocks and not last:
                    continue
                perm = rank_rng.permutation(filled)
                usable = filled - filled % local
                for i in range(0, usable, local):
                    if done == steps:
                        return
                    yield torch.from_numpy(pool[np.sort(perm[i:i + local])])
                    done += 1
                rest = np.sort(perm[usable:])
                pool[:len(rest)] = pool[rest]
                filled, blocks_in = len(rest), 0
        finally:
            blocks.close()


def _mark_last(items: Iterator[np.ndarray]) -> Iterator[tuple[bool, np.ndarray]]:
    """(is_last, item) pairs, looking one item ahead."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield False, prev
        prev = item
    yield True, prev
