"""The benchmark's naive step (official structure) does the same maths as ``training_step``.

The throughput benchmark divides our speed by the naive step's; that ratio
only means something if both compute the same loss and the same gradients
from the same parameters and masks, which is what these tests check.
"""

from __future__ import annotations

import pytest
import torch

from conmh.losses import two_views
from conmh.model import ConMH, ModelConfig
from conmh.recipes import Recipe
from conmh.train import training_step
from helpers import naive_reference as naive

# 3 encoder heads of width 32 keep the official head-size quirk (3 x 10 = 30 < 32).
CFG = dict(
    feature_dim=24,
    nbits=8,
    hidden_size=32,
    encoder_depth=2,
    encoder_heads=3,
    decoder_dim=16,
    decoder_depth=2,
    decoder_heads=2,
)


def make(frames: int, dtype: torch.dtype) -> ConMH:
    torch.manual_seed(0)
    model = ConMH(ModelConfig(frames=frames, **CFG)).to(dtype)
    with torch.no_grad():  # move every parameter off its init (zero biases, unit norms) so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def recipe(mask_ratio: float) -> Recipe:
    return Recipe(mask_ratio=mask_ratio, batch_size=6, epochs=1, alpha=0.7, temperature=0.5, tau_plus=0.1)


def loss_and_grads(step, model: ConMH, feats: torch.Tensor, rec: Recipe, seed: int):
    out = step(model, feats, rec, torch.Generator().manual_seed(seed))
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out.loss, params)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize(
    ("frames", "mask_ratio", "dtype", "tol"),
    [
        (25, 0.75, torch.float64, 1e-10),  # FCVID's views
        (30, 0.5, torch.float64, 1e-10),  # ActivityNet's views
        (25, 0.75, torch.float32, 2e-4),
        (7, 0.3, torch.float64, 1e-10),  # overlapping views (5 of 7 visible in each)
    ],
)
def test_naive_step_equals_training_step(frames: int, mask_ratio: float, dtype: torch.dtype, tol: float) -> None:
    model = make(frames, dtype)
    feats = torch.randn(6, frames, CFG["feature_dim"], generator=torch.Generator().manual_seed(1)).to(dtype)
    rec = recipe(mask_ratio)
    ours, g_ours = loss_and_grads(training_step, model, feats, rec, seed=5)
    ref, g_ref = loss_and_grads(naive.naive_training_step, model, feats, rec, seed=5)
    for a, b in ((ours.loss, ref.loss), (ours.recon, ref.recon), (ours.contrast, ref.contrast)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert ours.contrast.item() > 0 and ours.recon.item() > 0
    for name, grad in g_ours.items():
        assert grad.abs().sum() > 0, f"{name} gets no gradient: the comparison would not cover it"
        torch.testing.assert_close(grad, g_ref[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_a_different_mask_draw_changes_the_loss() -> None:
    """The equality above is not a coincidence of insensitive losses: other masks give another loss."""
    model = make(25, torch.float64)
    feats = torch.randn(6, 25, CFG["feature_dim"], generator=torch.Generator().manual_seed(1)).double()
    rec = recipe(0.75)
    a = naive.naive_training_step(model, feats, rec, torch.Generator().manual_seed(5))
    b = training_step(model, feats, rec, torch.Generator().manual_seed(6))
    assert abs(a.loss.item() - b.loss.item()) > 1e-6


@pytest.mark.parametrize(("frames", "mask_ratio"), [(25, 0.75), (30, 0.5), (7, 0.3)])
def test_view_masks_are_the_views_of_training(frames: int, mask_ratio: float) -> None:
    masks = naive.view_masks(5, frames, mask_ratio, torch.Generator().manual_seed(2))
    views = two_views(5, frames, mask_ratio, torch.Generator().manual_seed(2))
    flat = masks.reshape(10, frames)
    for row in range(10):
        assert torch.equal(torch.nonzero(~flat[row]).flatten(), views.visible[row])
        assert torch.equal(torch.nonzero(flat[row]).flatten(), views.masked[row])
