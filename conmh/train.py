"""ConMH training: two masked views, masked reconstruction + debiased contrastive loss.

Every epoch ends with one line in ``train_log.jsonl`` and an atomically written
``checkpoint.pt``; ``resume=True`` continues from that checkpoint. All
randomness of an epoch (video order, masks) is drawn from a generator seeded by
``(seed, epoch)``, so a resumed run gives the same weights as an uninterrupted
one. After ``recipe.epochs`` epochs the weights are kept as ``model.pt``
(official format, plus the architecture).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_path, write_text_atomic
from .errors import CheckpointError, ConfigError
from .losses import debiased_contrastive_loss, gather_frames, reconstruction_loss, two_views
from .model import ConMH, ModelConfig
from .recipes import Recipe

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = "conmh-train-1"

# Training arrays up to this size are loaded whole; larger ones are read batch
# by batch from the HDF5 files.
IN_MEMORY_LIMIT_BYTES = 4 << 30


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's randomness: a function of (seed, epoch) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation cut into batches; the last partial batch is dropped
    (a contrastive batch needs its full set of negatives) unless it is the only one."""
    order = torch.randperm(n, generator=generator)
    if n <= batch_size:
        return [order]
    return list(order[: n - n % batch_size].split(batch_size))


class TrainingArray:
    """The training features, whole in memory (on the training device) or read lazily per batch."""

    def __init__(self, feats, device: torch.device, in_memory: bool | None = None) -> None:
        self.source = feats
        if isinstance(feats, np.ndarray):
            self.n, self.frames, self.dim = feats.shape
        else:  # a lazy conmh.data.FeatureFiles
            self.n, self.frames, self.dim = feats.n, feats.frames, feats.dim
        nbytes = self.n * self.frames * self.dim * 4
        self.in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES if in_memory is None else in_memory
        self.device = device
        self.resident: torch.Tensor | None = None
        if self.in_memory:
            array = feats if isinstance(feats, np.ndarray) else feats.read(0, self.n)
            self.resident = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident is not None:
            return self.resident[idx.to(self.device)]
        rows = self.source[idx.numpy()] if isinstance(self.source, np.ndarray) else self.source.take(idx.numpy())
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device, non_blocking=True)


@dataclass
class StepOutput:
    loss: torch.Tensor
    recon: torch.Tensor
    contrast: torch.Tensor


def training_step(model: ConMH, feats: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> StepOutput:
    """Loss of one batch (B, T, D): both masked views in one batched forward pass."""
    b, t, _ = feats.shape
    views = two_views(b, t, recipe.mask_ratio, generator)
    visible, masked = views.visible.to(feats.device), views.masked.to(feats.device)
    codes = model.frame_codes(gather_frames(feats, visible), visible)  # (2B, v, bits)
    pred = model.reconstruct(codes, visible, masked)  # (2B, m, D)
    recon = reconstruction_loss(pred, gather_frames(feats, masked))
    video = codes.float().mean(dim=1)
    contrast = debiased_contrastive_loss(video[:b], video[b:], recipe.temperature, recipe.tau_plus)
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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    in_memory: bool | None = None,
    meta: dict | None = None,
) -> TrainResult:
    """Train ConMH on ``feats`` ((N, T, D) array or a lazy ``FeatureFiles``).

    ``stop_after`` ends this call after that many epochs in total (the run can
    be resumed later), used to interrupt runs in tests.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, final_path = out_dir / CHECKPOINT, out_dir / LOG, out_dir / FINAL_MODEL
    dev = select_device(device)
    torch.manual_seed(recipe.seed)
    model = ConMH(cfg).to(dev)
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
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        start = int(state["epoch"])
        if start > recipe.epochs:
            raise ConfigError(f"{ckpt_path}: the run already has {start} epochs, more than the {recipe.epochs} asked for")
    log = _read_log(log_path, start)
    write_text_atomic(log_path, "".join(json.dumps(e) + "\n" for e in log))

    data = TrainingArray(feats, dev, in_memory)
    if data.n < 2:
        raise ConfigError(f"training needs at least 2 videos (a contrastive pair of batches), got {data.n}")
    if (data.frames, data.dim) != (cfg.frames, cfg.feature_dim):
        raise ConfigError(
            f"training features have {data.frames} frames x {data.dim} dims, the model expects "
            f"{cfg.frames} x {cfg.feature_dim}"
        )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    end = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    model.train()
    for epoch in range(start, end):
        lr = recipe.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = epoch_generator(recipe.seed, epoch)
        batches = epoch_batches(data.n, recipe.batch_size, gen)
        sums = torch.zeros(3, dtype=torch.float64)
        videos = 0
        tic = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress, leave=False)
        for idx in bar:
            x = data.batch(idx)
            with autocast:
                out = training_step(model, x, recipe, gen)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            parts = torch.stack([out.loss.detach(), out.recon.detach(), out.contrast.detach()]).double().cpu()
            sums += parts * len(idx)
            videos += len(idx)
            if progress:
                bar.set_postfix(loss=f"{parts[0]:.4f}", recon=f"{parts[1]:.4f}", con=f"{parts[2]:.4f}",
                                vps=f"{videos / (time.perf_counter() - tic):.0f}")
        seconds = time.perf_counter() - tic
        mean = (sums / max(videos, 1)).tolist()
        entry = {"epoch": epoch + 1, "loss": mean[0], "recon": mean[1], "contrast": mean[2], "lr": lr,
                 "seconds": seconds, "videos_per_s": videos / seconds if seconds > 0 else None}
        _append_line(log_path, entry)
        log.append(entry)
        save_torch_atomic(
            {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "arch": cfg.to_dict(), "recipe": recipe.to_dict(),
             "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
             "meta": dict(meta or {})},
            ckpt_path,
        )
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {mean[0]:.4f} (recon {mean[1]:.4f}, contrast {mean[2]:.4f}), "
                       f"lr {lr:.2e}, {entry['videos_per_s']:.0f} videos/s")
    done = max(start, end)
    final = None
    if done >= recipe.epochs:
        final = final_path
        if not final_path.exists() or start < recipe.epochs:
            save_torch_atomic({"model_state_dict": model.state_dict(), "arch": cfg.to_dict(),
                               "recipe": recipe.to_dict(), "epoch": done, "meta": dict(meta or {})}, final_path)
    return TrainResult(out_dir=out_dir, epochs_done=done, final_model=final, log=log)
