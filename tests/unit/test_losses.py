"""Masks and losses against direct transcriptions of docs/reference.md §4."""

from __future__ import annotations

import math

import pytest
import torch

from conmh.losses import (
    debiased_contrastive_loss,
    gather_frames,
    masked_reconstruction_loss,
    num_visible,
    two_views,
)


def dcl_reference(z1: torch.Tensor, z2: torch.Tensor, t: float, tau: float) -> float:
    """The formula of docs/reference.md §4, one anchor at a time."""
    z = torch.cat([z1, z2]).double()
    u = z / z.norm(dim=1, keepdim=True)
    n = len(u)
    b = n // 2
    losses = []
    for i in range(n):
        j = (i + b) % n
        pos = math.exp(float(u[i] @ u[j]) / t)
        neg = sum(math.exp(float(u[i] @ u[k]) / t) for k in range(n) if k not in (i, j))
        ng = max((neg - tau * (n - 2) * pos) / (1 - tau), (n - 2) * math.exp(-1 / t))
        losses.append(-math.log(pos / (pos + ng)))
    return sum(losses) / n


@pytest.mark.parametrize("t,tau", [(0.5, 0.1), (0.5, 0.05), (0.2, 0.0), (1.0, 0.3)])
def test_dcl_matches_formula(t: float, tau: float) -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    assert debiased_contrastive_loss(z1, z2, t, tau).item() == pytest.approx(dcl_reference(z1, z2, t, tau), rel=1e-5)


def test_dcl_floor_for_orthogonal_videos() -> None:
    # one-hot codes: positives identical (<u,u+> = 1), negatives orthogonal (<u,v> = 0), so
    # neg - tau (2B-2) pos = (2B-2)(1 - tau e^2) < 0 and Ng is the floor (2B-2) e^(-1/t)
    z = torch.eye(4)
    t, tau, n = 0.5, 0.3, 8
    expected = -math.log(math.exp(2) / (math.exp(2) + (n - 2) * math.exp(-2)))
    assert debiased_contrastive_loss(z, z, t, tau).item() == pytest.approx(expected, rel=1e-6)
    assert dcl_reference(z, z, t, tau) == pytest.approx(expected, rel=1e-9)


def test_dcl_gradient_flows_to_both_views() -> None:
    z1 = torch.randn(5, 8, requires_grad=True)
    z2 = torch.randn(5, 8, requires_grad=True)
    debiased_contrastive_loss(z1, z2, 0.5, 0.1).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("frames,ratio,visible", [(25, 0.75, 7), (30, 0.5, 15), (25, 0.5, 13), (10, 0.0, 10)])
def test_views_sizes_disjointness_and_order(frames: int, ratio: float, visible: int) -> None:
    assert num_visible(frames, ratio) == visible
    b = 9
    views = two_views(b, frames, ratio, torch.Generator().manual_seed(1))
    assert views.visible.shape == (2 * b, visible)
    assert views.masked.shape == (2 * b, frames - visible)
    for row in range(2 * b):
        vis, msk = views.visible[row].tolist(), views.masked[row].tolist()
        assert vis == sorted(vis) and msk == sorted(msk)
        assert sorted(vis + msk) == list(range(frames))  # a partition of the frames
    for row in range(b):
        v1, v2 = set(views.visible[row].tolist()), set(views.visible[row + b].tolist())
        if 2 * visible <= frames:
            assert not v1 & v2  # the paper's ratios: the two visible sets are disjoint
        # view 2's masked frames are the first T - v of the shuffle, view 1's visible are the first v
        assert set(views.masked[row + b].tolist()) <= set(range(frames))
    # complementary for ActivityNet's 0.5 of 30: view 2 sees exactly view 1's masked frames
    if frames == 30 and ratio == 0.5:
        torch.testing.assert_close(views.visible[b:], views.masked[:b])


def test_views_differ_between_videos_and_follow_the_generator() -> None:
    a = two_views(64, 25, 0.75, torch.Generator().manual_seed(5))
    b = two_views(64, 25, 0.75, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.visible, b.visible)
    assert len({tuple(r) for r in a.visible[:64].tolist()}) > 60


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """docs/reference.md §4: the MSE of each view's masked frames, summed over the two views."""
    half = len(pred) // 2
    return ((pred[:half] - target[:half]) ** 2).mean() + ((pred[half:] - target[half:]) ** 2).mean()


def test_gather_frames_takes_each_video_twice() -> None:
    feats = torch.arange(2 * 4 * 1.0).view(2, 4, 1)
    idx = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
    out = gather_frames(feats, idx)[..., 0]
    assert out.tolist() == [[0, 1], [6, 7], [1, 3], [4, 6]]


def test_bad_mask_ratio_and_empty_batch_refused() -> None:
    with pytest.raises(ValueError):
        num_visible(25, 1.0)
    with pytest.raises(ValueError):
        debiased_contrastive_loss(torch.randn(0, 4), torch.randn(0, 4), 0.5, 0.1)


def test_dcl_of_one_video_is_zero_as_the_official_code() -> None:
    # A last partial batch of one video has no negatives: Ng is clamped at 0 and -log(pos / pos) = 0.
    loss = debiased_contrastive_loss(torch.randn(1, 4), torch.randn(1, 4), 0.5, 0.1)
    assert loss.item() == 0.0


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 64])
def test_chunked_masked_reconstruction_equals_the_formula_with_gradients(chunk_rows: int) -> None:
    """Chunked and checkpointed: the same loss and the same gradients as predicting everything at once."""
    torch.manual_seed(0)
    b, t, d = 3, 6, 5
    batch = torch.randn(b, t, d, dtype=torch.float64)
    views = two_views(b, t, 0.5, torch.Generator().manual_seed(1))
    head = torch.nn.Linear(4, d).double()
    hidden = torch.randn(2 * b, views.masked.shape[1], 4, dtype=torch.float64, requires_grad=True)
    expected = reconstruction_loss(head(hidden), gather_frames(batch, views.masked))
    g_expected = torch.autograd.grad(expected, [hidden, head.weight])
    loss = masked_reconstruction_loss(head, hidden, batch, views.masked, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for g, e in zip(grads, g_expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)
