"""The ConMH network (docs/reference.md §3) with the official checkpoints' parameter names.

Layout, as in the authors' release:

* ``encoder``: frame embedding ``patch_embed`` + fixed sinusoidal positions,
  pre-norm transformer ``blocks``, final ``norm`` and a linear ``head``;
* hash layer: ``binary`` (Linear to ``nbits``), ``ln`` (LayerNorm) and the
  binary activation, giving one {-1, +1} code per frame;
* ``encoder_to_decoder``, ``mask_token`` and the ``decoder``, used only in
  training to reconstruct the masked frames.

Two departures from the official code that do not change the maths: only the
visible frames are embedded (the official code embeds all then selects), and
attention uses ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .errors import CheckpointError, ConfigError
from .losses import masked_reconstruction_loss
from .presets import PRESETS

__all__ = [
    "PRESETS",
    "ConMH",
    "ModelConfig",
    "binary_activation",
    "load_checkpoint",
    "sinusoid_table",
]


@dataclass(frozen=True)
class ModelConfig:
    """Every size of the network. ``small`` is the preset of all paper results."""

    feature_dim: int = 4096
    frames: int = 25
    nbits: int = 64
    hidden_size: int = 256
    encoder_depth: int = 12
    encoder_heads: int = 6
    decoder_dim: int = 192
    decoder_depth: int = 2
    decoder_heads: int = 3
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ConfigError(f"model size {field.name} must be positive, got {value!r}")
        if self.hidden_size // self.encoder_heads == 0 or self.decoder_dim // self.decoder_heads == 0:
            raise ConfigError("more attention heads than the width allows (head size would be 0)")

    @classmethod
    def from_preset(cls, preset: str, **sizes: int) -> ModelConfig:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], **sizes})

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """Fixed positional table: even dims sin, odd dims cos of pos / 10000^(2*floor(j/2)/dim).

    Computed in float64 and rounded to float32 once, like the official table.
    """
    pos = np.arange(positions, dtype=np.float64)[:, None]
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return torch.from_numpy(table).float()


class BinaryActivation(torch.autograd.Function):
    """code = 2 * round(clamp((x + 1) / 2, 0, 1)) - 1.

    Backward: straight-through for the rounding, zero where the clamp is active
    and at exactly x = -1 (as the official code).
    Written as an autograd Function (not the detach trick) so that the forward
    is the exact rounding in the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = (x + 1) / 2
        ctx.save_for_backward(y)
        return 2 * torch.round(y.clamp(0, 1)) - 1  # torch.round: half to even

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        # 0 < y <= 1, as the official code: its clamp zeroes y > 1 and y < 0, and
        # its rounding's backward also zeroes y == 0 (x == -1 exactly).
        inside = (y > 0) & (y <= 1)
        # d code / d x = 2 * d round(y)/dy (=1, straight through) * d y/dx (=1/2)
        return grad * inside.to(grad.dtype)


def binary_activation(x: torch.Tensor) -> torch.Tensor:
    return BinaryActivation.apply(x)


class Attention(nn.Module):
    """Multi-head self-attention with the official layout.

    Quirk kept for checkpoint compatibility: the head size is ``dim // heads``,
    so attention may work in fewer dims than the width (6 x 42 = 252 for 256).
    ``qkv`` has no bias; q and v have separate bias vectors, k has none.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        inner = self.head_dim * heads
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v, self.head_dim**-0.5).transpose(1, 2).reshape(b, n, -1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention``; on CPU with its math backend.

    Our sequences are short (7 to 30 frames). There, PyTorch's CPU flash kernel
    is slower than the math backend, and with 2 threads 2-3.5x slower
    (benchmarks/README.md), so the CPU path asks for the math backend. On GPUs
    the default choice (flash or memory-efficient kernels) is kept, except
    under deterministic algorithms (``conmh.device.numerics``): the
    memory-efficient kernel's backward is not deterministic, the math one is.
    """
    if q.device.type == "cpu" or torch.are_deterministic_algorithms_enabled():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, exact GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def xavier_init(module: nn.Module) -> None:
    """The official encoder's and decoder's init: Xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at +-std, drawn as the official code draws it.

    Inverse-CDF sampling: one uniform draw per value in [2 Phi(-1) - 1,
    2 Phi(1) - 1], then erfinv. Written out because ``nn.init.trunc_normal_``
    of recent PyTorch samples by rejection: other draws from the same seed.
    """
    edge = math.erf(1.0 / math.sqrt(2.0))  # 2 Phi(1) - 1
    with torch.no_grad():
        return tensor.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-std, std)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(cfg.feature_dim, cfg.hidden_size)
        # Not a parameter and not saved: the official checkpoints do not hold it.
        self.register_buffer("pos_embed", sinusoid_table(cfg.frames, cfg.hidden_size), persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.hidden_size, cfg.encoder_heads, cfg.mlp_ratio) for _ in range(cfg.encoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.head = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(xavier_init)
        # Activation checkpointing: keep only each block's input and recompute its
        # inside in the backward pass (same values, less memory, more compute:
        # benchmarks/README.md). Set by ``conmh train --activation-checkpointing``.
        self.checkpoint_blocks = False

    def forward(self, feats: torch.Tensor, frame_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``feats`` (B, V, D): the frames at positions ``frame_idx`` (B, V).

        ``frame_idx`` None means the V frames are 0..V-1 (all frames visible).
        """
        x = self.patch_embed(feats)
        pos = self.pos_embed[: x.shape[1]] if frame_idx is None else self.pos_embed[frame_idx]
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.head = nn.Linear(cfg.decoder_dim, cfg.feature_dim)
        self.apply(xavier_init)

    def forward(self, x: torch.Tensor, num_masked: int) -> torch.Tensor:
        """The last ``num_masked`` tokens' hidden states after the blocks (before ``norm`` and ``head``)."""
        for block in self.blocks:
            x = block(x)
        return x[:, -num_masked:]

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted features (…, D) of masked tokens' hidden states."""
        return self.head(self.norm(hidden))


class ConMH(nn.Module):
    """Encoder + hash layer + (training only) decoder.

    Initialisation as in the official code: the encoder and the decoder apply
    ``xavier_init`` to their own layers; the hash layer (``binary``, ``ln``) and
    ``encoder_to_decoder`` keep PyTorch's default init (the official outer
    init function is never called); the mask token is a normal of std 0.02
    truncated at one standard deviation. Submodules are built in the official
    order, so the same torch seed gives the official model's initial weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.nbits, cfg.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("decoder_pos", sinusoid_table(cfg.frames, cfg.decoder_dim), persistent=False)
        self.binary = nn.Linear(cfg.hidden_size, cfg.nbits)
        self.ln = nn.LayerNorm(cfg.nbits)
        truncated_normal_(self.mask_token, std=0.02)

    def forward(
        self,
        visible_feats: torch.Tensor,
        visible_idx: torch.Tensor,
        masked_idx: torch.Tensor,
        batch: torch.Tensor,
        videos: int | None = None,
        of_videos: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass of the stacked views: per-frame codes of the visible frames (2B, v, bits) and
        the reconstruction loss of the masked frames of ``batch`` (B, T, D); ``videos`` and
        ``of_videos``: a data-parallel share's loss (see ``conmh.losses.masked_reconstruction_loss``)."""
        codes = self.frame_codes(visible_feats, visible_idx)
        hidden = self.decode(codes, visible_idx, masked_idx)
        loss = masked_reconstruction_loss(
            self.decoder.predict, hidden, batch, masked_idx, videos=videos, of_videos=of_videos
        )
        return codes, loss

    def frame_codes(self, feats: torch.Tensor, frame_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame {-1, +1} codes (B, V, nbits) of the given frames."""
        return binary_activation(self.ln(self.binary(self.encoder(feats, frame_idx))))

    @torch.no_grad()
    def video_mean_codes(self, feats: torch.Tensor) -> torch.Tensor:
        """Mean over all frames of the per-frame codes (B, nbits), in [-1, 1]."""
        return self.frame_codes(feats).float().mean(dim=1)

    def decode(self, codes: torch.Tensor, visible_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, M, decoder_dim) of the masked frames' tokens, from the visible frames' codes.

        Tokens are ordered visible first, then masked, each in ascending frame
        order, as in the official decoder.
        """
        b, m = masked_idx.shape
        vis = self.encoder_to_decoder(codes) + self.decoder_pos[visible_idx]
        mask = self.mask_token.expand(b, m, -1) + self.decoder_pos[masked_idx]
        return self.decoder(torch.cat([vis, mask.to(vis.dtype)], dim=1), m)

    def reconstruct(self, codes: torch.Tensor, visible_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        """Predict the masked frames' features (B, M, D) from the visible frames' codes."""
        return self.decoder.predict(self.decode(codes, visible_idx, masked_idx))


def encode_bits(mean_codes: torch.Tensor) -> torch.Tensor:
    """Sign of the frame mean as bits: 1 means +1.

    Tie rule (documented): an exact 0 in the mean, possible only with an even
    frame count, is mapped to +1 (bit 1). The official code emits 0 there.
    """
    return mean_codes >= 0


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checkpoint(path: str | Path, model: ConMH | None = None, cfg: ModelConfig | None = None) -> ConMH:
    """Load an official or own checkpoint into ``model`` (or a new model of ``cfg``).

    Accepts ``{'model_state_dict': ...}`` (official and own files) or a bare
    state dict, with or without a ``module.`` prefix. Always loads with
    ``weights_only=True``: a pickle that would run code is refused. When neither
    ``model`` nor ``cfg`` is given, the architecture recorded in the file
    (``arch``, written by ``conmh train``) is used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise CheckpointError(
            f"{path}: not a loadable checkpoint (only plain tensors and containers are accepted, "
            f"weights_only=True): {str(exc).splitlines()[0]}"
        ) from None
    if isinstance(blob, dict) and "model_state_dict" in blob:
        state = blob["model_state_dict"]
    else:
        state = blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors under 'model_state_dict'")
    state = _strip_module_prefix(state)
    if model is None:
        if cfg is None:
            arch = blob.get("arch") if isinstance(blob, dict) else None
            if not isinstance(arch, dict):
                raise CheckpointError(
                    f"{path}: the file does not record its architecture; give the preset, bits and feature dim"
                )
            cfg = ModelConfig(**arch)
        model = ConMH(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        parts = []
        for title, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(
            f"{path}: checkpoint does not fit the architecture {model.cfg.to_dict()}; " + "; ".join(parts)
        )
    model.load_state_dict(state)
    return model
