"""ConMH training: two masked views, masked reconstruction + debiased contrastive loss.

Every epoch ends with one line in ``train_log.jsonl`` and an atomically written
``checkpoint.pt``; ``resume=True`` continues from that checkpoint. All
randomness of an epoch (video order, masks) is drawn from a generator seeded by
``(seed, epoch)``, so a resumed run gives the same weights as an uninterrupted
one. After ``recipe.epochs`` epochs the weights are kept as ``model.pt``
(official format, plus the architecture).

Under ``torchrun`` (several processes, ``torch.distributed`` initialised) the
model is wrapped in DistributedDataParallel, each rank trains on its share of
every global batch of ``recipe.batch_size`` videos, and the contrastive loss
is computed over the whole global batch (codes gathered from all ranks), as in
the official single-process run. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import allocator
from .atomic import atomic_path, write_text_atomic
from .errors import CheckpointError, ConfigError
from .loader import ResidentBatches, StreamingBatches
from .losses import debiased_contrastive_loss, gather_frames, two_views
from .model import ConMH, ModelConfig
from .recipes import Recipe

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = "conmh-train-1"

# Data mode "auto": on the CPU, training arrays up to this size are held in
# host memory; on CUDA, arrays that take at most GPU_RESIDENT_FRACTION of the
# free GPU memory (in the compute dtype) are held there. Larger ones are streamed.
IN_MEMORY_LIMIT_BYTES = 4 << 30
GPU_RESIDENT_FRACTION = 0.5
DATA_MODES = ("auto", "memory", "stream")
PRECISIONS = ("auto", "fp32", "bf16")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present (this process's local rank under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator of one epoch's masks: a function of (seed, epoch, rank) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1024 + rank)


def compute_precision(precision: str = "auto") -> str:
    """``auto`` and ``fp32``: float32 on every device, as the official code trains;
    ``bf16``: bf16 autocast, asked for explicitly (other rounding, see README)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "fp32" if precision == "auto" else precision


@dataclass(frozen=True)
class DataPlan:
    """Where training batches come from: the array held on the device (``resident``) or streamed."""

    resident: bool
    dtype: torch.dtype  # of the array held on the device; streamed batches are cast to it


def plan_data(nbytes_fp32: int, device_type: str, precision: str, mode: str = "auto",
              free_device_bytes: int | None = None) -> DataPlan:
    """Decide resident or streamed for a training array of ``nbytes_fp32`` bytes in float32.

    The held array has the compute dtype (float32, or bf16 under bf16
    autocast). ``free_device_bytes`` is the free GPU memory (CUDA only).
    """
    if mode not in DATA_MODES:
        raise ConfigError(f"data mode must be one of {DATA_MODES}, got {mode!r}")
    dtype = COMPUTE_DTYPES[compute_precision(precision)]
    if mode != "auto":
        return DataPlan(resident=mode == "memory", dtype=dtype)
    held = nbytes_fp32 * dtype.itemsize // 4
    if device_type == "cuda":
        if free_device_bytes is None:
            raise ValueError("plan_data needs the free GPU memory for a CUDA device")
        return DataPlan(resident=held <= GPU_RESIDENT_FRACTION * free_device_bytes, dtype=dtype)
    return DataPlan(resident=held <= IN_MEMORY_LIMIT_BYTES, dtype=dtype)


def make_batches(feats, device: torch.device, plan: DataPlan) -> ResidentBatches | StreamingBatches:
    """The batch source of ``plan`` (see ``conmh.loader``)."""
    if plan.resident:
        return ResidentBatches(feats, device, dtype=plan.dtype)
    return StreamingBatches(feats)


def set_float32_matmul(device: torch.device) -> None:
    """float32 means float32: no TF32 in CUDA matrix products and convolutions."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's context for a resolved precision: bf16 autocast, or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class StepOutput:
    loss: torch.Tensor
    recon: torch.Tensor
    contrast: torch.Tensor


def training_step(model: nn.Module, feats: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> StepOutput:
    """Loss of one batch (B, T, D): both masked views in one batched forward pass.

    ``model`` is a ConMH or a DistributedDataParallel around one; in the latter
    case the contrastive loss sees the video codes of every rank's batch.
    """
    b, t, _ = feats.shape
    views = two_views(b, t, recipe.mask_ratio, generator)
    visible, masked = views.visible.to(feats.device), views.masked.to(feats.device)
    codes, recon = model(gather_frames(feats, visible), visible, masked, feats)  # (2B, v, bits), loss
    video = codes.float().mean(dim=1)
    z1, z2 = video[:b], video[b:]
    if _distributed()[1] > 1:  # all ranks' codes, with gradients flowing back to their owners
        z1 = torch.cat(dist_nn.all_gather(z1))
        z2 = torch.cat(dist_nn.all_gather(z2))
    contrast = debiased_contrastive_loss(z1, z2, recipe.temperature, recipe.tau_plus)
    return StepOutput(recon + recipe.alpha * contrast, recon, contrast)


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    final_model: Path | None
    log: list[dict]


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """Log entries of completed (checkpointed) epochs; a torn last line is dropped."""
    entries = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("epoch", 1 << 30) <= upto_epoch:
                    entries.append(entry)
    return entries


def _append_line(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_torch_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` through a buffer: the zip records the file's name, so
    saving straight to the temporary name would make equal weights differ in bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _load_training_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the training checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a conmh training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def train(
    feats,
    cfg: ModelConfig,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    activation_checkpointing: bool = False,
    keep_freed_memory: bool = False,
    data_mode: str = "auto",
    precision: str = "auto",
    meta: dict | None = None,
) -> TrainResult:
    """Train ConMH on ``feats`` ((N, T, D) array or a lazy ``FeatureFiles``).

    ``precision`` (see ``compute_precision``) picks float32 or bf16 autocast;
    the choice is recorded in the checkpoints' ``meta`` and in every log line.

    ``activation_checkpointing`` recomputes the encoder blocks in the backward
    pass instead of keeping their activations (less memory, more compute, the
    same weights).

    ``keep_freed_memory``: when the training array is held in memory, tell
    glibc to keep freed memory in the process (``conmh.allocator``: fewer page
    faults, RSS at its peak). Streamed runs keep glibc's defaults: they stream
    because memory is scarce, and the kept heap's fragmentation costs them
    about 1 GB of RSS at FCVID's batch of 512.

    ``stop_after`` ends this call after that many epochs in total (the run can
    be resumed later), used to interrupt runs in tests.
    """
    out_dir = Path(out_dir)
    rank, world = _distributed()
    lead = rank == 0
    ckpt_path, log_path, final_path = out_dir / CHECKPOINT, out_dir / LOG, out_dir / FINAL_MODEL
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.pt.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    dev = select_device(device)
    precision = compute_precision(precision)
    set_float32_matmul(dev)
    n, frames, dim = feats.shape if isinstance(feats, np.ndarray) else (feats.n, feats.frames, feats.dim)
    if (frames, dim) != (cfg.frames, cfg.feature_dim):
        raise ConfigError(
            f"training features have {frames} frames x {dim} dims, the model expects {cfg.frames} x {cfg.feature_dim}"
        )
    if n < 2 * world:
        raise ConfigError(f"training needs at least 2 videos per process, got {n} for {world} process(es)")
    torch.manual_seed(recipe.seed)
    model = ConMH(cfg).to(dev)
    model.encoder.checkpoint_blocks = activation_checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    start = 0
    if ckpt_path.exists():
        if not resume:
            raise ConfigError(
                f"{ckpt_path} exists: pass --resume to continue that run, or choose another output folder"
            )
        state = _load_training_checkpoint(ckpt_path)
        if state["arch"] != cfg.to_dict():
            raise ConfigError(f"{ckpt_path}: saved architecture {state['arch']} differs from {cfg.to_dict()}")
        saved = {k: v for k, v in state["recipe"].items() if k != "epochs"}
        if saved != {k: v for k, v in recipe.to_dict().items() if k != "epochs"}:
            raise ConfigError(f"{ckpt_path}: saved recipe {state['recipe']} differs from {recipe.to_dict()}")
        start = int(state["epoch"])
        if start > recipe.epochs:
            raise ConfigError(f"{ckpt_path}: the run already has {start} epochs, more than the {recipe.epochs} asked for")
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
    log = _read_log(log_path, start)
    if lead:
        write_text_atomic(log_path, "".join(json.dumps(e) + "\n" for e in log))

    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    plan = plan_data(n * frames * dim * 4, dev.type, precision, data_mode, free)
    if keep_freed_memory and plan.resident:
        allocator.keep_freed_memory()
    batches = make_batches(feats, dev, plan)
    steps_per_epoch = -(-n // recipe.batch_size)
    net: nn.Module = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if world > 1 else model
    end = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    net.train()
    for epoch in range(start, end):
        lr = recipe.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = epoch_generator(recipe.seed, epoch, rank)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, recon, contrast (x videos), videos
        tic = time.perf_counter()
        bar = tqdm(batches.epoch(recipe.seed, epoch, recipe.batch_size, rank, world),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   disable=not (progress and lead), leave=False)
        for x in bar:
            x = x.to(dev, plan.dtype, non_blocking=True)
            with autocast_context(dev, precision):
                out = training_step(net, x, recipe, gen)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            parts = torch.stack([out.loss.detach(), out.recon.detach(), out.contrast.detach()]).double().cpu()
            sums += torch.cat([parts * len(x), torch.tensor([len(x)], dtype=torch.float64)])
            if progress and lead:
                bar.set_postfix(loss=f"{parts[0]:.4f}", recon=f"{parts[1]:.4f}", con=f"{parts[2]:.4f}",
                                vps=f"{sums[3] * world / (time.perf_counter() - tic):.0f}")
        if world > 1:
            dist.all_reduce(sums)
        seconds = time.perf_counter() - tic
        videos = int(sums[3])
        mean = (sums[:3] / max(videos, 1)).tolist()
        entry = {"epoch": epoch + 1, "loss": mean[0], "recon": mean[1], "contrast": mean[2], "lr": lr,
                 "precision": precision, "seconds": seconds, "videos_per_s": videos / seconds if seconds > 0 else None}
        log.append(entry)
        if lead:
            _append_line(log_path, entry)
            save_torch_atomic(
                {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "arch": cfg.to_dict(), "recipe": recipe.to_dict(),
                 "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                 "meta": dict(meta or {}, world_size=world, precision=precision)},
                ckpt_path,
            )
            if progress:
                tqdm.write(f"epoch {epoch + 1}: loss {mean[0]:.4f} (recon {mean[1]:.4f}, contrast {mean[2]:.4f}), "
                           f"lr {lr:.2e}, {entry['videos_per_s']:.0f} videos/s")
        if world > 1:
            dist.barrier()
    done = max(start, end)
    final = None
    if done >= recipe.epochs:
        final = final_path
        if lead and (not final_path.exists() or start < recipe.epochs):
            save_torch_atomic({"model_state_dict": model.state_dict(), "arch": cfg.to_dict(),
                               "recipe": recipe.to_dict(), "epoch": done,
                               "meta": dict(meta or {}, precision=precision)}, final_path)
    return TrainResult(out_dir=out_dir, epochs_done=done, final_model=final, log=log)
