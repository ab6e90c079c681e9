"""The model loads the authors' checkpoints and encodes exactly as their code does."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conmh.errors import CheckpointError
from conmh.model import (
    PRESETS,
    ConMH,
    ModelConfig,
    binary_activation,
    encode_bits,
    load_checkpoint,
    sinusoid_table,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official-checkpoint"


def fixture_config(frames: int) -> ModelConfig:
    arch = json.loads((FIXTURE / "arch.json").read_text())
    return ModelConfig(
        feature_dim=arch["feature_dim"],
        frames=frames,
        nbits=arch["nbits"],
        hidden_size=arch["hidden_size"],
        encoder_depth=arch["encoder_depth"],
        encoder_heads=arch["encoder_heads"],
        decoder_dim=arch["decoder_dim"],
        decoder_depth=arch["decoder_depth"],
        decoder_heads=arch["decoder_heads"],
        mlp_ratio=arch["mlp_ratio"],
    )


@pytest.mark.parametrize("frames", [25, 30])
@pytest.mark.parametrize("name", ["checkpoint.pth", "checkpoint_module_prefix.pth"])
def test_codes_match_official_code(frames: int, name: str) -> None:
    model = load_checkpoint(FIXTURE / name, cfg=fixture_config(frames))
    with h5py.File(FIXTURE / f"feats_{frames}frames.h5", "r") as fh:
        feats = torch.from_numpy(fh["feats"][:])
    official = np.load(FIXTURE / f"codes_{frames}frames.npy")
    mean = model.video_mean_codes(feats).numpy()
    # The official sign, value for value (zeros included) ...
    np.testing.assert_array_equal(np.sign(mean).astype(np.int8), official)
    # ... and our stored bits agree with every non-zero official entry; zeros become +1.
    bits = encode_bits(torch.from_numpy(mean)).numpy()
    nonzero = official != 0
    np.testing.assert_array_equal(bits[nonzero], official[nonzero] > 0)
    assert bits[~nonzero].all()
    assert (~nonzero).sum() == (33 if frames == 30 else 0)


def test_official_parameter_names_and_no_position_tables_saved() -> None:
    official = torch.load(FIXTURE / "checkpoint.pth", weights_only=True)["model_state_dict"]
    ours = ConMH(fixture_config(25)).state_dict()
    assert set(ours) == set(official)
    assert all(ours[k].shape == official[k].shape for k in ours)
    # the attention head-size quirk: 6 heads of 64 // 6 = 10 -> 60 dims
    assert official["encoder.blocks.0.attn.qkv.weight"].shape == (180, 64)
    assert official["encoder.blocks.0.attn.proj.weight"].shape == (64, 60)


def test_small_preset_sizes() -> None:
    model = ConMH(ModelConfig.from_preset("small", feature_dim=4096, frames=25, nbits=64))
    sd = model.state_dict()
    assert sd["encoder.blocks.0.attn.qkv.weight"].shape == (756, 256)
    assert sd["encoder.blocks.0.attn.q_bias"].shape == (252,)
    assert sd["encoder.blocks.11.mlp.fc1.weight"].shape == (1024, 256)
    assert "encoder.blocks.12.norm1.weight" not in sd
    assert sd["decoder.head.weight"].shape == (4096, 192)
    assert sd["encoder_to_decoder.weight"].shape == (192, 64)
    assert sd["mask_token"].shape == (1, 1, 192)
    assert set(PRESETS) == {"mini", "small", "base", "large"}


def test_sinusoid_table_formula() -> None:
    table = sinusoid_table(25, 6).double()
    pos, j = 7, 3
    angle = pos / 10000 ** (2 * (j // 2) / 6)
    assert table[pos, j].item() == pytest.approx(np.cos(angle), abs=1e-7)
    assert table[pos, 2].item() == pytest.approx(np.sin(pos / 10000 ** (2 / 6)), abs=1e-7)


def test_binary_activation_forward_and_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, -0.2, 0.0, 0.2, 1.0, 2.0], requires_grad=True)
    y = binary_activation(x)
    # (x + 1) / 2 = 0.5 at x = 0 rounds half to even: 0 -> code -1
    assert y.tolist() == [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    # straight through inside the clamp, zero outside and at exactly x = -1
    # (the official rounding's backward zeroes y = (x + 1) / 2 == 0); x = 1 passes
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def _official_truncated_normal(tensor: torch.Tensor, std: float) -> None:
    """Transcription of the official ``trunc_normal_``: bounds at -std and +std."""
    import math

    def cdf(v: float) -> float:
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    lo, hi = cdf(-1.0), cdf(1.0)
    with torch.no_grad():
        tensor.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(min=-std, max=std)


def official_initial_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The official constructor's random draws, transcribed in their order (see the class docstring of ConMH).

    Each Linear is first built (PyTorch's default init draws), then the encoder
    and the decoder re-draw theirs with Xavier-uniform and zero biases; the outer
    model's own Linears (encoder_to_decoder, binary) keep the default init.
    """
    from torch import nn

    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def linears(prefix: str, dim: int, heads: int, depth: int, mlp: int, first: tuple, last: tuple) -> list:
        inner = (dim // heads) * heads
        layers = [(f"{prefix}.{first[0]}", nn.Linear(*first[1:]))] if first else []
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            layers += [
                (f"{b}.attn.qkv", nn.Linear(dim, 3 * inner, bias=False)),
                (f"{b}.attn.proj", nn.Linear(inner, dim)),
                (f"{b}.mlp.fc1", nn.Linear(dim, mlp)),
                (f"{b}.mlp.fc2", nn.Linear(mlp, dim)),
            ]
        return layers + [(f"{prefix}.{last[0]}", nn.Linear(*last[1:]))]

    def xavier(layers: list) -> None:
        for name, layer in layers:
            nn.init.xavier_uniform_(layer.weight)
            state[f"{name}.weight"] = layer.weight.detach()
            if layer.bias is not None:
                state[f"{name}.bias"] = torch.zeros_like(layer.bias)

    h, dd = cfg.hidden_size, cfg.decoder_dim
    xavier(
        linears(
            "encoder",
            h,
            cfg.encoder_heads,
            cfg.encoder_depth,
            int(h * cfg.mlp_ratio),
            ("patch_embed", cfg.feature_dim, h),
            ("head", h, h),
        )
    )
    xavier(
        linears(
            "decoder",
            dd,
            cfg.decoder_heads,
            cfg.decoder_depth,
            int(dd * cfg.mlp_ratio),
            (),
            ("head", dd, cfg.feature_dim),
        )
    )
    state["encoder_to_decoder.weight"] = nn.Linear(cfg.nbits, dd, bias=False).weight.detach()
    binary = nn.Linear(h, cfg.nbits)
    state["binary.weight"], state["binary.bias"] = binary.weight.detach(), binary.bias.detach()
    mask_token = torch.zeros(1, 1, dd)
    _official_truncated_normal(mask_token, std=0.02)
    state["mask_token"] = mask_token
    return state


@pytest.mark.parametrize("preset", ["mini", "small"])
def test_initial_weights_equal_the_official_initialisation(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset, feature_dim=64, nbits=16, frames=25)
    expected = official_initial_state(cfg, seed=3)
    torch.manual_seed(3)
    ours = ConMH(cfg).state_dict()
    for name, value in ours.items():
        if name in expected:
            assert torch.equal(value, expected[name]), name
        elif name.endswith("q_bias") or name.endswith("v_bias") or ".norm" in name or name.startswith("ln."):
            # zeros, or LayerNorm ones/zeros: drawn from nothing
            fill = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(value == fill), name
        else:
            raise AssertionError(f"{name} is not covered by the transcription")
    # The hash layer keeps PyTorch's default init: uniform within 1/sqrt(fan_in), not Xavier's wider bound.
    assert ours["binary.weight"].abs().max() <= cfg.hidden_size**-0.5
    assert ours["mask_token"].abs().max() <= 0.02


def test_embedding_visible_frames_equals_embedding_all_then_selecting() -> None:
    torch.manual_seed(0)
    model = ConMH(ModelConfig.from_preset("mini", feature_dim=16, frames=10, nbits=8))
    feats = torch.randn(3, 10, 16)
    idx = torch.tensor([[0, 3, 7], [1, 2, 9], [4, 5, 6]])
    selected = feats[torch.arange(3)[:, None], idx]
    direct = model.encoder(selected, idx)
    # the official way: embed every frame, add positions, then select
    enc = model.encoder
    x = enc.patch_embed(feats) + enc.pos_embed
    x = x[torch.arange(3)[:, None], idx]
    for block in enc.blocks:
        x = block(x)
    torch.testing.assert_close(direct, enc.head(enc.norm(x)))


def test_misshaped_checkpoint_names_every_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(
            FIXTURE / "checkpoint.pth", cfg=dataclasses.replace(fixture_config(25), nbits=64, encoder_depth=3)
        )
    msg = str(err.value)
    assert "checkpoint.pth" in msg
    assert "missing: encoder.blocks.2." in msg
    assert "mis-shaped: binary.bias (file (32,), model (64,))" in msg


def test_unexpected_keys_reported(tmp_path: Path) -> None:
    state = torch.load(FIXTURE / "checkpoint.pth", weights_only=True)
    state["model_state_dict"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected: extra.weight"):
        load_checkpoint(path, cfg=fixture_config(25))


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model_state_dict": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path, cfg=fixture_config(25))


def test_garbage_and_missing_files_are_checkpoint_errors(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(path, cfg=fixture_config(25))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth", cfg=fixture_config(25))
    with pytest.raises(CheckpointError, match="architecture"):
        load_checkpoint(FIXTURE / "checkpoint.pth")  # official files do not record it
