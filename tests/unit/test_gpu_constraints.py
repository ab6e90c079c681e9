"""What only a GPU would show, checked on the CPU (issue: every multi-GPU run died at its first epoch's end).

* a collective on a tensor that is not on the training device (NCCL takes CUDA
  tensors only), or a device tensor copied to the host mid-epoch: one epoch runs
  on PyTorch's ``meta`` device, which has no host copy at all, with spies on
  the collectives;
* a dtype that autocast changes: bf16 autocast on the CPU;
* TF32, which NVIDIA's containers switch on with an environment variable: the
  variable set, and the flags read while training and encoding compute;
* the caller's model moved or switched to eval mode by encoding;
* deterministic mode: the flags and the attention kernel it selects.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import conmh.train
from conmh.device import numerics
from conmh.errors import ConfigError
from conmh.loader import ResidentBatches
from conmh.losses import debiased_contrastive_loss
from conmh.model import ConMH, ModelConfig, attention
from conmh.recipes import Recipe
from conmh.train import EpochContext, train, train_one_epoch
from helpers import tf32_probe

CFG = ModelConfig(
    feature_dim=16,
    frames=6,
    nbits=8,
    hidden_size=32,
    encoder_depth=1,
    encoder_heads=2,
    decoder_dim=16,
    decoder_depth=1,
    decoder_heads=2,
)
RECIPE = Recipe(mask_ratio=0.5, batch_size=8, epochs=1, alpha=1.0, temperature=0.5, tau_plus=0.1, lr=1e-3)


class EpochEnd(Exception):
    """Raised by the spy at the end-of-epoch reduction: the meta device cannot print a log line."""


def test_an_epoch_keeps_every_tensor_and_collective_on_the_training_device(monkeypatch) -> None:
    """Two ranks' worth of an epoch (the second rank's codes faked by the spy) on the meta device."""
    device = torch.device("meta")
    world = 3
    collectives: list[tuple[str, torch.device]] = []

    def all_gather_into_tensor(out: torch.Tensor, z: torch.Tensor) -> None:
        collectives.append(("all_gather_into_tensor", z.device))
        out.copy_(z.repeat(world, *[1] * (z.dim() - 1)))

    def all_reduce(t: torch.Tensor, *args, **kwargs) -> None:
        collectives.append(("all_reduce", t.device))
        raise EpochEnd

    monkeypatch.setattr(conmh.train, "_process_group", lambda: (0, world))
    monkeypatch.setattr(conmh.train.dist, "all_gather_into_tensor", all_gather_into_tensor)
    monkeypatch.setattr(conmh.train.dist, "all_reduce", all_reduce)
    model = ConMH(CFG).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    feats = np.random.default_rng(0).standard_normal((21, 6, 16)).astype(np.float32)
    batches = ResidentBatches(feats, device)
    ctx = EpochContext(device=device, precision="fp32", dtype=torch.float32, rank=0, world=world, progress=False)
    with pytest.raises(EpochEnd):  # any host copy of a meta tensor before it raises NotImplementedError instead
        train_one_epoch(model, optimizer, batches, RECIPE, 0, ctx)
    steps = 3  # 21 videos in batches of 8: 8, 8, 5
    assert collectives == [("all_gather_into_tensor", device)] * steps + [("all_reduce", device)]


def test_the_contrastive_loss_stays_float32_under_bf16_autocast() -> None:
    """Under autocast u @ u.T ran in bf16: loss 4.906250 against 4.899081 in float32 on a 512 x 64 batch."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g)
    exact = debiased_contrastive_loss(z1, z2, 0.5, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = debiased_contrastive_loss(z1, z2, 0.5, 0.1)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, exact)


def test_training_and_encoding_compute_without_tf32_even_when_the_environment_turns_it_on(tmp_path) -> None:
    seen = tf32_probe.run(CFG, RECIPE, tmp_path / "run", "cpu")
    assert seen["before"] == [True, True]  # what the variable makes the default
    assert seen["train"] == [[False, False]]  # every module's forward pass computed without TF32
    assert seen["encode"] == [[False, False]]
    assert seen["after"] == [True, True]  # and the caller's settings are back


def test_encoding_leaves_the_callers_model_where_and_as_it_was(monkeypatch) -> None:
    from conmh.api import encode_videos

    model = ConMH(CFG).train()
    moved = []
    to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        moved.append(self)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    feats = np.random.default_rng(0).standard_normal((5, 6, 16)).astype(np.float32)
    codes = encode_videos(model, feats, device="cpu")
    assert codes.shape == (5, 1)
    assert model.training  # encoding ran in eval mode, then gave the model back in train mode
    assert not any(m is model for m in moved)


@pytest.mark.parametrize("ratio", [0.0, 0.03])
def test_a_mask_ratio_that_masks_no_frame_is_refused_before_training(tmp_path, ratio) -> None:
    frames = 25  # int(0.03 x 25) = 0: no masked frame, nothing to reconstruct
    cfg = ModelConfig(**{**CFG.to_dict(), "frames": frames})
    feats = np.zeros((4, frames, 16), np.float32)
    with pytest.raises(ConfigError, match="masks no frame"):
        train(feats, cfg, RECIPE.replace(mask_ratio=ratio), tmp_path, device="cpu", progress=False)
    assert not tmp_path.joinpath("checkpoint.pt").exists()


def test_deterministic_mode_sets_the_kernels_and_restores_the_callers_settings(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    kernels = []

    def sdpa(q, k, v, **kwargs):
        kernels.append(torch.backends.cuda.mem_efficient_sdp_enabled() or torch.backends.cuda.flash_sdp_enabled())
        return torch.empty_like(q)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    q = torch.empty(2, 2, 5, 4, device="meta")  # a device other than the CPU, as a GPU's
    attention(q, q, q, 0.5)
    with numerics(deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        attention(q, q, q, 0.5)
    assert kernels == [True, False]  # the fast kernels by default; the math kernel, deterministic, in this mode
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_float32_numerics_leave_torchs_deterministic_mode_alone_and_restore_a_callers_warn_only_mode(
    monkeypatch,
) -> None:
    """numerics() sets torch's deterministic mode again on exit only where it changed: the call imports
    torch._inductor, which every encode process paid for at exit."""
    calls = []
    use = torch.use_deterministic_algorithms
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **kw: calls.append(a) or use(*a, **kw))
    with numerics():
        pass
    assert calls == []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with numerics(deterministic=True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_plain_cuda_means_this_processs_gpu_by_number(monkeypatch) -> None:
    """Under torchrun `--device cuda` is the rank's GPU, which the command made current: the device is
    named by number, as DDP's device_ids and the log name it (a bare "cuda" left that to whatever was current)."""
    from conmh.device import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert select_device("cuda") == torch.device("cuda", 3)
    assert select_device("cuda:1") == torch.device("cuda", 1)


def test_a_lone_process_under_torchrun_joins_its_process_group(monkeypatch) -> None:
    """So one GPU runs the collectives under NCCL (tests/gpu); tests/e2e/test_distributed.py checks that
    such a run trains the plain run's weights. (Before, only WORLD_SIZE > 1 joined.)"""
    import socket

    import torch.distributed as dist

    from conmh.cli import _init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    assert _init_distributed("cpu")
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()
    monkeypatch.delenv("MASTER_ADDR")
    assert not _init_distributed("cpu")  # not started by torchrun
