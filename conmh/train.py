"""ConMH training: two masked views, masked reconstruction + debiased contrastive loss.

Every epoch ends with ``train_log.jsonl`` (one line per epoch) and
``checkpoint.pt`` written atomically; ``resume=True`` continues from that
checkpoint. All randomness of an epoch (video order, masks) is drawn from a
generator seeded by ``(seed, epoch)``, so a resumed run gives the same weights
as an uninterrupted one. After ``recipe.epochs`` epochs the weights are kept as
``model.pt`` (official format, plus the architecture).

Under ``torchrun`` (several processes, ``torch.distributed`` initialised) the
model is wrapped in DistributedDataParallel and each rank trains on its share
of every global batch of ``recipe.batch_size`` videos (``conmh.loader``),
with the masks the single process would draw for those videos; the
contrastive loss is computed over the whole global batch (codes gathered from
all ranks). So a run on N processes is the computation of the official
single-process run, up to float summation order. Rank 0 alone reads and
writes files: it hands the checkpoint it resumes from to the other ranks, so
nodes need not share the output folder.

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
    numerics,
    plan_data,
    select_device,
)
from .errors import CheckpointError, ConfigError, ConMHError
from .loader import ResidentBatches, StreamingBatches, rank_share
from .losses import debiased_contrastive_loss, gather_frames, num_visible, two_views
from .model import ConMH, ModelConfig
from .recipes import Recipe

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = "conmh-train-1"


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's masks: a function of (seed, epoch) only, the same on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1024)


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) of this process in its process group (joined under torchrun, even alone), else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


# --------------------------------------------------------------------------- one step, one epoch


@dataclass
class StepOutput:
    loss: torch.Tensor  # what this process backpropagates
    recon: torch.Tensor  # this process's part of the global batch's reconstruction loss (all of it on one process)
    contrast: torch.Tensor  # the global batch's contrastive loss


def gather_codes(video: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's codes of each view (batch, bits), in batch order, from every rank's padded share.

    ``video`` is this rank's share, its two views stacked (view 1's rows, then
    view 2's): both views travel in one all-gather. This rank's rows keep their
    gradient; the other ranks' rows are constants. Each rank so gets the
    gradient of the whole batch's loss with respect to its own codes, and the
    sum over ranks is the single process's gradient (``training_step`` scales
    the loss by the world size, DDP averages).
    """
    rank, world = _process_group()
    rows = len(video) // 2
    everyone = torch.empty((world * len(video), *video.shape[1:]), dtype=video.dtype, device=video.device)
    dist.all_gather_into_tensor(everyone, video.detach().contiguous())
    shares = list(everyone.split(len(video)))
    shares[rank] = video
    sizes = [len(range(batch)[rank_share(batch, r, world)]) for r in range(world)]
    z1, z2 = (
        torch.cat([share[view * rows : view * rows + size] for share, size in zip(shares, sizes)]) for view in (0, 1)
    )
    return z1, z2


def training_step(
    model: nn.Module,
    feats: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    *,
    first: int = 0,
    batch: int | None = None,
) -> StepOutput:
    """Loss of one batch (B, T, D): both masked views in one batched forward pass.

    On one process ``feats`` is the batch. Data-parallel (``model`` a
    DistributedDataParallel around a ConMH): ``feats`` is this rank's share,
    positions ``first, first + 1, ...`` of a global batch of ``batch`` videos
    whose masks every rank draws alike; the share is padded with zero videos
    to the largest share's size (they are neither reconstructed nor
    contrasted), and the contrastive loss sees the codes of the whole batch.
    """
    k, t, dim = feats.shape
    batch = k if batch is None else batch
    group = _process_group()
    world = group[1] if group else 1
    rows = -(-batch // world)  # every rank's share padded to this size
    views = two_views(batch, t, recipe.mask_ratio, generator)
    if group:  # this share's masks; padding rows borrow other videos' masks
        pos = (first + torch.arange(rows)) % batch
        views = type(views)(
            visible=torch.cat([views.visible[pos], views.visible[batch + pos]]),
            masked=torch.cat([views.masked[pos], views.masked[batch + pos]]),
        )
        feats = torch.cat([feats, feats.new_zeros(rows - k, t, dim)])
    visible, masked = views.visible.to(feats.device), views.masked.to(feats.device)
    codes, recon = model(gather_frames(feats, visible), visible, masked, feats, videos=k, of_videos=batch)
    video = codes.float().mean(dim=1)
    z1, z2 = gather_codes(video, batch) if group else (video[:rows], video[rows:])
    contrast = debiased_contrastive_loss(z1, z2, recipe.temperature, recipe.tau_plus)
    loss = recon + recipe.alpha * contrast
    return StepOutput(loss * world if world > 1 else loss, recon, contrast)


@dataclass(frozen=True)
class EpochContext:
    """What every epoch of a run shares besides the model, the optimizer and the data."""

    device: torch.device
    precision: str  # resolved: "fp32" or "bf16"
    dtype: torch.dtype  # of the batches on the device
    rank: int
    world: int
    progress: bool  # this process draws a progress bar and prints a line per epoch
    deterministic: bool = False


def train_one_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: ResidentBatches | StreamingBatches,
    recipe: Recipe,
    epoch: int,
    ctx: EpochContext,
) -> dict:
    """Train 0-based ``epoch`` once over the data; return its log entry (means over the epoch's videos).

    Nothing here copies a device tensor to the host before the epoch's end,
    and the one collective (the sums of the log) runs on the training device:
    NCCL takes CUDA tensors only.
    """
    lr = recipe.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    gen = epoch_generator(recipe.seed, epoch)
    # loss, recon, contrast, each summed over the epoch's videos (this rank's part)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    done = 0  # videos of the global batches so far
    tic = time.perf_counter()
    bar = tqdm(
        batches.epoch(recipe.seed, epoch, recipe.batch_size, ctx.rank, ctx.world),
        total=-(-batches.n // recipe.batch_size),
        desc=f"epoch {epoch + 1}/{recipe.epochs}",
        disable=not ctx.progress,
        leave=False,
    )
    for x in bar:
        batch = min(recipe.batch_size, batches.n - done)
        share = rank_share(batch, ctx.rank, ctx.world)
        x = x.to(ctx.device, ctx.dtype, non_blocking=True)
        with autocast_context(ctx.device, ctx.precision):
            out = training_step(net, x, recipe, gen, first=share.start, batch=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        recon, contrast = out.recon.detach(), out.contrast.detach() * (len(x) / batch)
        sums += torch.stack([recon + recipe.alpha * contrast, recon, contrast]).double() * batch
        done += batch
        if ctx.progress:  # rank 0, whose share is never empty
            parts = (sums / done * ctx.world).tolist()
            bar.set_postfix(
                loss=f"{parts[0]:.4f}",
                recon=f"{parts[1]:.4f}",
                con=f"{parts[2]:.4f}",
                vps=f"{done / (time.perf_counter() - tic):.0f}",
            )
    if _process_group():
        dist.all_reduce(sums)
    seconds = time.perf_counter() - tic
    mean = (sums / max(done, 1)).tolist()
    return {
        "epoch": epoch + 1,
        "loss": mean[0],
        "recon": mean[1],
        "contrast": mean[2],
        "lr": lr,
        "precision": ctx.precision,
        "deterministic": ctx.deterministic,
        "device": device_name(ctx.device),
        "world_size": ctx.world,
        "seconds": seconds,
        "videos_per_s": done / seconds if seconds > 0 else None,
    }


def sum_in_rank_order(_state, bucket):  # unannotated: DDP checks the annotations, which are strings here
    """DDP communication hook of deterministic mode: the mean of every rank's gradients, summed in rank order.

    An all-reduce sums each gradient in an order that follows its place in
    DDP's buckets, and DDP regroups the buckets after its first iteration: a
    resumed run's first step would round differently from the uninterrupted
    run's. Gathered and summed in rank order, every element sums the same way
    whatever the buckets, at the cost of gathering (world x) the gradients.
    """
    grad = bucket.buffer()
    world = dist.get_world_size()
    everyone = torch.empty(world * grad.numel(), dtype=grad.dtype, device=grad.device)

    def mean(_gathered) -> torch.Tensor:
        shares = everyone.split(grad.numel())
        total = shares[0].clone()
        for share in shares[1:]:
            total += share
        return total / world

    # The pattern of DDP's own hooks: the collective's future, then the reduction (CUDA streams synchronised).
    return dist.all_gather_into_tensor(everyone, grad, async_op=True).get_future().then(mean)


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


def checkpoint_to_resume(out_dir: Path, cfg: ModelConfig, recipe: Recipe, resume: bool) -> dict | None:
    """The training checkpoint in ``out_dir`` to continue from; None for a new run.

    Refuses a checkpoint without ``resume``, or one of another architecture or
    recipe (only ``epochs`` may change).
    """
    ckpt_path = out_dir / CHECKPOINT
    if not ckpt_path.exists():
        return None
    if not resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another output folder")
    state = _load_training_checkpoint(ckpt_path)
    if state["arch"] != cfg.to_dict():
        raise ConfigError(f"{ckpt_path}: saved architecture {state['arch']} differs from {cfg.to_dict()}")
    saved = {k: v for k, v in state["recipe"].items() if k != "epochs"}
    if saved != {k: v for k, v in recipe.to_dict().items() if k != "epochs"}:
        raise ConfigError(f"{ckpt_path}: saved recipe {state['recipe']} differs from {recipe.to_dict()}")
    if int(state["epoch"]) > recipe.epochs:
        raise ConfigError(
            f"{ckpt_path}: the run already has {state['epoch']} epochs, more than the {recipe.epochs} asked for"
        )
    return state


def _from_rank0(load) -> dict | None:
    """``load()`` on rank 0, handed to every rank (with its error, raised everywhere): ranks on other
    nodes may not see rank 0's output folder, and all must start from the same epoch and weights."""
    if _process_group() is None:
        return load()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = load()
        except ConMHError as exc:
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ConMHError):
        raise box[0]
    return box[0]


def _prepare_out_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (".*.pt.*.tmp", f".{LOG}.*.tmp"):  # left by a process killed mid-write
        for stale in out_dir.glob(pattern):
            stale.unlink(missing_ok=True)


def held_out_evaluator(dataset: str, data_dir: str | Path, device: str = "auto", batch_size: int = 1024):
    """``evaluate(model)`` for ``train``: the held-out split (database and queries) encoded with the model as
    ``conmh encode`` encodes it, then mAP@K (``conmh.metrics``) and the seconds both took.

    Reads and encodes the whole held-out split each time: about the cost of
    ``conmh encode`` plus ``conmh evaluate`` (benchmarks/README.md).
    """
    from .encode import encode_features, encode_splits
    from .metrics import KS, map_at_k

    dev = select_device(device)

    def evaluate(model: ConMH) -> dict:
        def encode(feats, split: str) -> np.ndarray:
            return encode_features(model, feats, dev, batch_size, False, split)

        tic = time.perf_counter()
        codes = encode_splits(dataset, Path(data_dir), model.cfg.nbits, "conmh", encode, {})
        maps = map_at_k(codes.database, codes.database_labels, codes.queries, codes.query_labels, codes.bits, KS)
        return {"map": {str(k): v for k, v in maps.items()}, "seconds": round(time.perf_counter() - tic, 3)}

    return evaluate


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    final_model: Path | None
    log: list[dict]


def _feature_shape(feats, cfg: ModelConfig) -> tuple[int, int, int]:
    """(videos, frames, dims) of the training features, checked against the model."""
    n, frames, dim = feats.shape if isinstance(feats, np.ndarray) else (feats.n, feats.frames, feats.dim)
    if (frames, dim) != (cfg.frames, cfg.feature_dim):
        raise ConfigError(
            f"training features have {frames} frames x {dim} dims, the model expects {cfg.frames} x {cfg.feature_dim}"
        )
    if n < 2:
        raise ConfigError(f"training needs at least 2 videos, got {n}")
    return n, frames, dim


def _check_mask_ratio(recipe: Recipe, frames: int) -> None:
    masked = frames - num_visible(frames, recipe.mask_ratio)
    if masked < 1:
        raise ConfigError(
            f"mask ratio {recipe.mask_ratio} masks no frame of {frames} (int(ratio x frames) = 0): "
            f"nothing to reconstruct; use at least {1 / frames:.3g}"
        )


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
    keep_freed_memory: bool = True,
    data_mode: str = "auto",
    precision: str = "auto",
    deterministic: bool = False,
    meta: dict | None = None,
    eval_every: int = 0,
    evaluate=None,
) -> TrainResult:
    """Train ConMH on ``feats`` ((N, T, D) array or a lazy ``FeatureFiles``).

    ``precision`` (see ``conmh.device.compute_precision``) picks float32 or bf16
    autocast; the choice is recorded in the checkpoints' ``meta`` and in every
    log line.

    ``activation_checkpointing`` recomputes the encoder blocks in the backward
    pass instead of keeping their activations (less memory, more compute, the
    same weights).

    ``keep_freed_memory`` (default, as ``conmh train``): when the training array
    is held in memory, tell glibc to keep freed memory in the process
    (``conmh.allocator``: fewer page faults, RSS at its peak; process-wide).
    Streamed runs keep glibc's defaults: they stream because memory is scarce,
    and the kept heap's fragmentation costs them RSS (benchmarks/README.md).

    ``deterministic``: bit-reproducible kernels on GPUs too (``conmh.device.numerics``);
    on CPUs the kernels used are deterministic anyway.

    ``stop_after`` ends this call after that many epochs in total (the run can
    be resumed later), used to interrupt runs in tests.

    ``eval_every`` N > 0 with ``evaluate`` (a function of the model returning
    a JSON-able dict, e.g. :func:`held_out_evaluator`): after every N-th epoch
    rank 0 evaluates the model and the epoch's log line gets the result under
    ``eval``. The weights are untouched (no gradients, the random state
    restored afterwards): a run trains the same weights with and without it.
    """
    out_dir = Path(out_dir)
    group = _process_group()
    rank, world = group or (0, 1)
    lead = rank == 0
    dev = select_device(device)
    precision = compute_precision(precision)
    n, frames, dim = _feature_shape(feats, cfg)
    _check_mask_ratio(recipe, frames)
    if lead:
        _prepare_out_dir(out_dir)
    # float32 without TF32 (and deterministic kernels if asked) while the model is built and trained
    with numerics(deterministic):
        torch.manual_seed(recipe.seed)
        model = ConMH(cfg).to(dev)
        model.encoder.checkpoint_blocks = activation_checkpointing
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=0.0)
        state = _from_rank0(lambda: checkpoint_to_resume(out_dir, cfg, recipe, resume))
        start = 0
        if state is not None:
            start = int(state["epoch"])
            model.load_state_dict(state["model_state_dict"])
            optimizer.load_state_dict(state["optimizer_state_dict"])
        log = _read_log(out_dir / LOG, start) if lead else []
        if lead:
            _write_log(out_dir / LOG, log)  # drops the lines of epochs after the checkpoint

        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
        plan = plan_data(n * frames * dim * 4, dev.type, precision, data_mode, free)
        if keep_freed_memory and plan.resident:
            allocator.keep_freed_memory()
        batches = make_batches(feats, dev, plan)
        net: nn.Module = model
        if group:
            net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
            if deterministic:
                net.register_comm_hook(None, sum_in_rank_order)
        ctx = EpochContext(
            device=dev,
            precision=precision,
            dtype=plan.dtype,
            rank=rank,
            world=world,
            progress=progress and lead,
            deterministic=deterministic,
        )
        meta = dict(meta or {}, **({"deterministic": True} if deterministic else {}))
        end = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
        net.train()
        for epoch in range(start, end):
            entry = train_one_epoch(net, optimizer, batches, recipe, epoch, ctx)
            if lead and evaluate is not None and eval_every > 0 and (epoch + 1) % eval_every == 0:
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    entry["eval"] = evaluate(model)
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
                    meta=dict(meta, world_size=world, precision=precision),
                )
                if ctx.progress:
                    tqdm.write(
                        f"epoch {epoch + 1}: loss {entry['loss']:.4f} (recon {entry['recon']:.4f}, "
                        f"contrast {entry['contrast']:.4f}), lr {entry['lr']:.2e}, "
                        f"{entry['videos_per_s']:.0f} videos/s"
                    )
            if group:
                dist.barrier()

    done = max(start, end)
    final = None
    if done >= recipe.epochs:
        final = out_dir / FINAL_MODEL
        if lead and (not final.exists() or start < recipe.epochs):
            save_final_model(final, model, cfg, recipe, done, meta=dict(meta, precision=precision))
    return TrainResult(out_dir=out_dir, epochs_done=done, final_model=final, log=log)
