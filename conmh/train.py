"""ConMH training: two masked views, masked reconstruction + debiased contrastive loss.

Every epoch ends with ``train_log.jsonl`` (one line per epoch) and
``checkpoint.pt`` written atomically; ``resume=True`` continues from that
checkpoint. All randomness of an epoch (video order, masks) is drawn from a
generator seeded by ``(seed, epoch)``, so a resumed run gives the same weights
as an uninterrupted one. After ``recipe.epochs`` epochs the weights are kept as
``model.pt`` (official format, plus the architecture).

Under ``torchrun`` (several processes, ``torch.distributed`` initialised) the
model is wrapped in DistributedDataParallel, each rank trains on its share of
every global batch of ``recipe.batch_size`` videos, and the contrastive loss
is computed over the whole global batch (codes gathered from all ranks), as in
the official single-process run. Rank 0 alone writes files.

Reading order: :func:`train` (set up, resume, loop over epochs, save) calls
:func:`train_one_epoch`, which calls :func:`training_step` for every batch.
Where the data lives and in what precision it is computed: ``conmh.device``.
"""

from __future__ import annotations

import contextlib
import io
import json
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
from .device import (
    autocast_context,
    compute_precision,
    device_name,
    make_batches,
    plan_data,
    select_device,
    set_float32_matmul,
)
from .errors import CheckpointError, ConfigError
from .loader import ResidentBatches, StreamingBatches
from .losses import debiased_contrastive_loss, gather_frames, two_views
from .model import ConMH, ModelConfig
from .recipes import Recipe

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = "conmh-train-1"


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator of one epoch's masks: a function of (seed, epoch, rank) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1024 + rank)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- one step, one epoch


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


@dataclass(frozen=True)
class EpochContext:
    """What every epoch of a run shares besides the model, the optimizer and the data."""

    device: torch.device
    precision: str  # resolved: "fp32" or "bf16"
    dtype: torch.dtype  # of the batches on the device
    rank: int
    world: int
    progress: bool  # this process draws a progress bar and prints a line per epoch


def train_one_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: ResidentBatches | StreamingBatches,
    recipe: Recipe,
    epoch: int,
    ctx: EpochContext,
    steps: int,
) -> dict:
    """Train 0-based ``epoch`` once over the data; return its log entry (means over all ranks' videos)."""
    lr = recipe.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    gen = epoch_generator(recipe.seed, epoch, ctx.rank)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, recon, contrast (x videos), videos
    tic = time.perf_counter()
    bar = tqdm(
        batches.epoch(recipe.seed, epoch, recipe.batch_size, ctx.rank, ctx.world),
        total=steps,
        desc=f"epoch {epoch + 1}/{recipe.epochs}",
        disable=not ctx.progress,
        leave=False,
    )
    for x in bar:
        x = x.to(ctx.device, ctx.dtype, non_blocking=True)
        with autocast_context(ctx.device, ctx.precision):
            out = training_step(net, x, recipe, gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        parts = torch.stack([out.loss.detach(), out.recon.detach(), out.contrast.detach()]).double().cpu()
        sums += torch.cat([parts * len(x), torch.tensor([len(x)], dtype=torch.float64)])
        if ctx.progress:
            bar.set_postfix(
                loss=f"{parts[0]:.4f}",
                recon=f"{parts[1]:.4f}",
                con=f"{parts[2]:.4f}",
                vps=f"{sums[3] * ctx.world / (time.perf_counter() - tic):.0f}",
            )
    if ctx.world > 1:
        dist.all_reduce(sums)
    seconds = time.perf_counter() - tic
    videos = int(sums[3])
    mean = (sums[:3] / max(videos, 1)).tolist()
    return {
        "epoch": epoch + 1,
        "loss": mean[0],
        "recon": mean[1],
        "contrast": mean[2],
        "lr": lr,
        "precision": ctx.precision,
        "device": device_name(ctx.device),
        "world_size": ctx.world,
        "seconds": seconds,
        "videos_per_s": videos / seconds if seconds > 0 else None,
    }


# --------------------------------------------------------------------------- the run's files


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


def _write_log(path: Path, entries: list[dict]) -> None:
    """The whole log, rewritten atomically (one short line per epoch, so cheap): never a torn line."""
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))


def save_torch_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` through a buffer: the zip records the file's name, so
    saving straight to the temporary name would make equal weights differ in bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def save_checkpoint(
    path: Path,
    model: ConMH,
    optimizer: torch.optim.Optimizer,
    cfg: ModelConfig,
    recipe: Recipe,
    epochs_done: int,
    meta: dict,
) -> None:
    """The training checkpoint after ``epochs_done`` epochs: everything ``resume_run`` needs."""
    save_torch_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": epochs_done,
            "arch": cfg.to_dict(),
            "recipe": recipe.to_dict(),
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "meta": meta,
        },
        path,
    )


def save_final_model(path: Path, model: ConMH, cfg: ModelConfig, recipe: Recipe, epochs_done: int, meta: dict) -> None:
    """The trained weights in the official format, plus the architecture (``conmh.model.load_checkpoint``)."""
    save_torch_atomic(
        {
            "model_state_dict": model.state_dict(),
            "arch": cfg.to_dict(),
            "recipe": recipe.to_dict(),
            "epoch": epochs_done,
            "meta": meta,
        },
        path,
    )


def _load_training_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the training checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a conmh training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def resume_run(
    out_dir: Path, model: ConMH, optimizer: torch.optim.Optimizer, cfg: ModelConfig, recipe: Recipe, resume: bool
) -> tuple[int, list[dict]]:
    """The epochs already done in ``out_dir`` and their log entries; (0, []) for a new run.

    Loads the checkpoint's weights and optimizer state into ``model`` and
    ``optimizer``. Refuses a checkpoint without ``resume``, or one of another
    architecture or recipe (only ``epochs`` may change).
    """
    ckpt_path = out_dir / CHECKPOINT
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
            raise ConfigError(
                f"{ckpt_path}: the run already has {start} epochs, more than the {recipe.epochs} asked for"
            )
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
    return start, _read_log(out_dir / LOG, start)


def _prepare_out_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (".*.pt.*.tmp", f".{LOG}.*.tmp"):  # left by a process killed mid-write
        for stale in out_dir.glob(pattern):
            stale.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    final_model: Path | None
    log: list[dict]


def _feature_shape(feats, cfg: ModelConfig, world: int) -> tuple[int, int, int]:
    """(videos, frames, dims) of the training features, checked against the model and the process count."""
    n, frames, dim = feats.shape if isinstance(feats, np.ndarray) else (feats.n, feats.frames, feats.dim)
    if (frames, dim) != (cfg.frames, cfg.feature_dim):
        raise ConfigError(
            f"training features have {frames} frames x {dim} dims, the model expects {cfg.frames} x {cfg.feature_dim}"
        )
    if n < 2 * world:
        raise ConfigError(f"training needs at least 2 videos per process, got {n} for {world} process(es)")
    return n, frames, dim


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

    ``precision`` (see ``conmh.device.compute_precision``) picks float32 or bf16
    autocast; the choice is recorded in the checkpoints' ``meta`` and in every
    log line.

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
    if lead:
        _prepare_out_dir(out_dir)
    dev = select_device(device)
    precision = compute_precision(precision)
    set_float32_matmul(dev)
    n, frames, dim = _feature_shape(feats, cfg, world)

    torch.manual_seed(recipe.seed)
    model = ConMH(cfg).to(dev)
    model.encoder.checkpoint_blocks = activation_checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    start, log = resume_run(out_dir, model, optimizer, cfg, recipe, resume)
    if lead:
        _write_log(out_dir / LOG, log)  # drops the lines of epochs after the checkpoint

    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    plan = plan_data(n * frames * dim * 4, dev.type, precision, data_mode, free)
    if keep_freed_memory and plan.resident:
        allocator.keep_freed_memory()
    batches = make_batches(feats, dev, plan)
    net: nn.Module = (
        DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else model
    )
    ctx = EpochContext(
        device=dev, precision=precision, dtype=plan.dtype, rank=rank, world=world, progress=progress and lead
    )
    end = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    net.train()
    for epoch in range(start, end):
        entry = train_one_epoch(net, optimizer, batches, recipe, epoch, ctx, steps=-(-n // recipe.batch_size))
        log.append(entry)
        if lead:
            _write_log(out_dir / LOG, log)
            save_checkpoint(
                out_dir / CHECKPOINT,
                model,
                optimizer,
                cfg,
                recipe,
                epoch + 1,
                meta=dict(meta or {}, world_size=world, precision=precision),
            )
            if ctx.progress:
                tqdm.write(
                    f"epoch {epoch + 1}: loss {entry['loss']:.4f} (recon {entry['recon']:.4f}, "
                    f"contrast {entry['contrast']:.4f}), lr {entry['lr']:.2e}, "
                    f"{entry['videos_per_s']:.0f} videos/s"
                )
        if world > 1:
            dist.barrier()

    done = max(start, end)
    final = None
    if done >= recipe.epochs:
        final = out_dir / FINAL_MODEL
        if lead and (not final.exists() or start < recipe.epochs):
            save_final_model(final, model, cfg, recipe, done, meta=dict(meta or {}, precision=precision))
    return TrainResult(out_dir=out_dir, epochs_done=done, final_model=final, log=log)
