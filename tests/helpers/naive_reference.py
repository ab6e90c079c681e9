"""A naive ConMH training step, structured like the authors' release, for benchmarking.

It computes the same loss and gradients as ``conmh.train.training_step`` with
the same parameters (a ``conmh.model.ConMH`` instance) and the same masks (the
same generator draws), but does the work the way the official code does:

* every frame of the batch is embedded, then the visible ones are picked with
  a boolean mask (``x[~mask]``);
* the two masked views go through the network in two separate forward passes;
* attention is unfused: ``(q * scale) @ k^T``, softmax, ``@ v``, in the encoder
  and in the decoder;
* the reconstruction targets are picked with the boolean mask, and the loss is
  one ``F.mse_loss`` per view plus the debiased contrastive loss of
  ``conmh.losses``.

The binary activation is ``conmh.model.binary_activation`` (the maths of our
model), so that both steps differ only in how the work is organised and the
speed ratio compares equal work (``tests/unit/test_naive_reference.py`` checks the
equality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conmh.losses import debiased_contrastive_loss, two_views
from conmh.model import Attention, Block, ConMH, binary_activation
from conmh.recipes import Recipe
from conmh.train import StepOutput

__all__ = ["naive_training_step", "view_masks", "naive_forward"]


def naive_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out as in the official code (no fused kernel)."""
    b, n, _ = x.shape
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias, requires_grad=False), attn.v_bias))
    qkv = F.linear(input=x, weight=attn.qkv.weight, bias=bias)
    qkv = qkv.reshape(b, n, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn.head_dim**-0.5
    weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(out)


def naive_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    x = x + naive_attention(block.attn, block.norm1(x))
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


def naive_forward(model: ConMH, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One view: (predicted masked frames (B, M, D), per-frame codes of the visible frames (B, V, bits)).

    ``mask`` (B, T) bool is True on the masked frames, as in the official code.
    """
    enc, dec = model.encoder, model.decoder
    b = feats.shape[0]
    x = enc.patch_embed(feats)  # all T frames
    x = x + enc.pos_embed.type_as(x).clone().detach()
    c = x.shape[-1]
    x = x[~mask].reshape(b, -1, c)
    for block in enc.blocks:
        x = naive_block(block, x)
    x = enc.head(enc.norm(x))
    codes = binary_activation(model.ln(model.binary(x)))

    vis = model.encoder_to_decoder(codes)
    cd = vis.shape[-1]
    pos = model.decoder_pos.expand(b, -1, -1).type_as(vis).clone().detach()
    pos_vis = pos[~mask].reshape(b, -1, cd)
    pos_mask = pos[mask].reshape(b, -1, cd)
    x = torch.cat([vis + pos_vis, model.mask_token + pos_mask], dim=1)
    for block in dec.blocks:
        x = naive_block(block, x)
    m = pos_mask.shape[1]
    return dec.head(dec.norm(x[:, -m:])), codes


def view_masks(batch: int, frames: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean masks (2, B, T), True = masked, of the same two views ``training_step`` draws."""
    views = two_views(batch, frames, mask_ratio, generator)
    mask = torch.zeros(2 * batch, frames, dtype=torch.bool)
    mask.scatter_(1, views.masked, True)
    return mask.view(2, batch, frames)


def naive_training_step(model: ConMH, feats: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> StepOutput:
    """Loss of one batch (B, T, D), computed the official way (two forward passes)."""
    b, t, d = feats.shape
    mask1, mask2 = view_masks(b, t, recipe.mask_ratio, generator).to(feats.device)
    pred1, codes1 = naive_forward(model, feats, mask1)
    pred2, codes2 = naive_forward(model, feats, mask2)
    target1 = feats[mask1].reshape(b, -1, d)
    target2 = feats[mask2].reshape(b, -1, d)
    recon = F.mse_loss(pred1, target1) + F.mse_loss(pred2, target2)
    contrast = debiased_contrastive_loss(
        codes1.float().mean(dim=1), codes2.float().mean(dim=1), recipe.temperature, recipe.tau_plus
    )
    return StepOutput(recon + recipe.alpha * contrast, recon, contrast)
