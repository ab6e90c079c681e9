"""The GPU path on a real GPU (marker ``gpu``; skipped without CUDA): ``python -m pytest -m gpu``.

With ``benchmarks/bench_gpu.py`` (speed and memory at FCVID's shapes) these are the checks to run first
when a GPU is at hand: a torchrun training under NCCL through a whole epoch and its checkpoint, float32
without TF32 in training and encoding even under TORCH_ALLOW_TF32_CUBLAS_OVERRIDE, and deterministic
mode giving identical weights on a rerun and on a resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conmh.model import ModelConfig
from conmh.recipes import Recipe
from conmh.synthetic import MiniatureSpec, make_miniature
from conmh.train import CHECKPOINT, FINAL_MODEL, LOG, train
from helpers import tf32_probe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RECIPE = Recipe(mask_ratio=0.75, batch_size=128, epochs=2, alpha=1.0, temperature=0.5, tau_plus=0.1, lr=1e-4)


def test_torchrun_under_nccl_trains_an_epoch_and_checkpoints_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spec = MiniatureSpec(n_train=300, n_database=40, n_queries=10, feature_dim=256, n_classes=4)
    make_miniature("fcvid", data, seed=0, spec=spec)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "conmh"]
    cmd += ["train", "--dataset", "fcvid", "--data-dir", str(data), "--bits", "64", "--out-dir", str(out)]
    cmd += ["--epochs", "1", "--batch-size", "128", "--device", "cuda", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["meta"]["world_size"] == 1
    (entry,) = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert entry["device"].startswith("cuda") and np.isfinite(entry["loss"])
    assert (out / FINAL_MODEL).exists()


def test_float32_training_and_encoding_use_no_tf32_even_when_the_environment_asks_for_it(tmp_path: Path) -> None:
    cfg = ModelConfig.from_preset("small", feature_dim=4096, frames=25, nbits=64)
    seen = tf32_probe.run(cfg, RECIPE.replace(batch_size=8, epochs=1), tmp_path / "run", "cuda")
    assert seen["before"] == [True, True]
    assert seen["train"] == [[False, False]] and seen["encode"] == [[False, False]]
    assert seen["encoder_error"] < 1e-4, seen  # TF32 products: about 1e-3


def test_deterministic_mode_reruns_and_resumes_to_identical_weights(tmp_path: Path) -> None:
    cfg = ModelConfig.from_preset("small", feature_dim=512, frames=25, nbits=64)
    feats = np.maximum(np.random.default_rng(0).standard_normal((700, 25, 512)), 0).astype(np.float32)

    def weights(name: str, **kwargs) -> dict[str, torch.Tensor]:
        for stop in kwargs.pop("stops", [None]):
            train(
                feats,
                cfg,
                RECIPE,
                tmp_path / name,
                device="cuda",
                progress=False,
                resume=True,
                stop_after=stop,
                deterministic=True,
                **kwargs,
            )
        return torch.load(tmp_path / name / FINAL_MODEL, weights_only=True)["model_state_dict"]

    first, again, resumed = weights("first"), weights("again"), weights("resumed", stops=[1, None])
    for key in first:
        assert torch.equal(first[key], again[key]), key
        assert torch.equal(first[key], resumed[key]), key
    bf16, bf16_again = weights("bf16", precision="bf16"), weights("bf16-again", precision="bf16")
    assert all(torch.equal(bf16[key], bf16_again[key]) for key in bf16)  # deterministic in bf16 too
