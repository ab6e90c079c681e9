"""The two masked views and the two losses of ConMH training (docs/reference.md §4)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Views:
    """Frame indices of the two complementary masked views, each (2B, ·), sorted ascending.

    Rows 0..B-1 are view 1 of each video, rows B..2B-1 view 2 of the same videos.
    """

    visible: torch.Tensor  # (2B, v)
    masked: torch.Tensor  # (2B, T - v)


def num_visible(frames: int, mask_ratio: float) -> int:
    """``T - int(mask_ratio * T)``, as the official code counts it."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return frames - int(mask_ratio * frames)


def two_views(batch: int, frames: int, mask_ratio: float, generator: torch.Generator | None = None) -> Views:
    """Shuffle each video's frame indices once; view 1 sees the first v, view 2 the last v.

    With the paper's ratios (0.75 of 25, 0.5 of 30) the two visible sets are
    disjoint. Indices inside each group are sorted ascending: the official code
    selects frames with a boolean mask, which keeps frame order.
    """
    v = num_visible(frames, mask_ratio)
    perm = torch.rand(batch, frames, generator=generator).argsort(dim=1)
    vis1, vis2 = perm[:, :v], perm[:, frames - v :]
    mask1, mask2 = perm[:, v:], perm[:, : frames - v]
    visible = torch.cat([vis1, vis2]).sort(dim=1).values
    masked = torch.cat([mask1, mask2]).sort(dim=1).values
    return Views(visible=visible, masked=masked)


def gather_frames(feats: torch.Tensor, idx: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Rows of ``feats`` (B, T, D) at frame indices ``idx`` (2B, k), the batch taken twice.

    ``first_row``: ``idx`` holds rows ``first_row, first_row + 1, ...`` of the 2B stacked rows.
    """
    b = feats.shape[0]
    rows = (torch.arange(idx.shape[0], device=feats.device) + first_row) % b
    return feats[rows[:, None], idx]


def masked_reconstruction_loss(
    predict: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    batch: torch.Tensor,
    masked_idx: torch.Tensor,
    chunk_rows: int = 128,
    *,
    videos: int | None = None,
    of_videos: int | None = None,
) -> torch.Tensor:
    """MSE of each view's predicted masked frames, summed over the two views.

    ``hidden`` (2B, M, ·) are the masked tokens' decoder states of the two
    stacked views (rows 0..B-1 view 1, B..2B-1 view 2), ``masked_idx`` (2B, M)
    their frames in ``batch`` (B, T, D). The two views have the same size, so
    the sum of their means is twice the mean over both.

    Data-parallel shares: only the first ``videos`` rows of each view count
    (the rest pad a rank's share), and the mean is taken over ``of_videos``
    videos (the global batch), so that the ranks' losses add up to the global
    batch's loss. By default every row counts and the mean is over B videos.

    On the CPU the predictions and targets (2B x M x D: 300 MB at FCVID's batch
    of 512) are never held whole: each chunk of rows is predicted, compared and,
    as under activation checkpointing, predicted again in the backward pass (the
    same loss up to float summation order, at a fraction of the host memory).
    GPU memory holds them easily: there everything is computed at once.
    """
    rows = hidden.shape[0]
    if rows % 2:
        raise ValueError(f"expected the two views stacked (an even batch), got {rows} rows")
    half = rows // 2
    videos = half if videos is None else videos
    of_videos = half if of_videos is None else of_videos
    # Padding rows are predicted (so every parameter takes part in the backward pass, as DDP needs) but not counted.
    counted = torch.arange(rows, device=hidden.device) % half < videos if videos < half else None

    def squared_error(h: torch.Tensor, idx: torch.Tensor, start: int) -> torch.Tensor:
        pred = predict(h)
        if pred.dtype in (torch.float16, torch.bfloat16):  # autocast output: the loss in float32
            pred = pred.float()
        error = (pred - gather_frames(batch, idx, first_row=start).to(pred.dtype)).square()
        return error if counted is None else error[counted[start : start + len(h)]]

    if hidden.device.type != "cpu":
        total = squared_error(hidden, masked_idx, 0).sum()
    else:
        total = sum(
            checkpoint(
                lambda h, idx, start: squared_error(h, idx, start).sum(),
                hidden[start : start + chunk_rows],
                masked_idx[start : start + chunk_rows],
                start,
                use_reentrant=False,
            )
            for start in range(0, rows, chunk_rows)
        )
    # Mean of each view, summed over the two views: the total over of_videos * M * D.
    return 2 * total / (2 * of_videos * masked_idx.shape[1]) / batch.shape[-1]


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def debiased_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, tau_plus: float) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al., 2020) between two views' video codes.

    For each of the 2B anchors u with positive u+: pos = exp(<u,u+>/t),
    neg = sum of exp(<u,v>/t) over the 2B-2 other samples,
    Ng = max((neg - tau+ (2B-2) pos) / (1 - tau+), (2B-2) e^(-1/t)),
    loss = mean of -log(pos / (pos + Ng)), on L2-normalised codes.
    """
    b = z1.shape[0]
    if b < 1:
        raise ValueError("the contrastive loss needs at least 1 video in a batch")
    # b == 1 (a last partial batch of one video): no negatives, the loss is 0, as in the official code.
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    with _without_autocast(u.device.type):  # under bf16 autocast u @ u.T would round to bf16 (the loss 0.15% off)
        sim = torch.exp(u @ u.T / temperature)
    idx = torch.arange(2 * b, device=u.device)
    partner = (idx + b) % (2 * b)
    pos = sim[idx, partner]
    n_neg = 2 * b - 2
    excluded = (idx[:, None] == idx[None, :]) | (partner[:, None] == idx[None, :])
    neg = sim.masked_fill(excluded, 0.0).sum(dim=1)
    ng = (neg - tau_plus * n_neg * pos) / (1 - tau_plus)
    ng = ng.clamp(min=n_neg * math.exp(-1 / temperature))
    return -torch.log(pos / (pos + ng)).mean()
