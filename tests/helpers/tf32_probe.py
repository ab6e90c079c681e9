"""Train and encode in a process started with TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (as NVIDIA's containers
start every process), recording the TF32 flags at every module's forward pass and, on a GPU, how far the
encoder's float32 outputs are from float64's (TF32 products would put them about 1e-3 off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conmh.model import ModelConfig
from conmh.recipes import Recipe

PROBE = """
import json, sys
import numpy as np, torch
from conmh.encode import encode_features
from conmh.features import ArrayFeatures
from conmh.model import ConMH, ModelConfig
from conmh.recipes import Recipe
from conmh.train import train

cfg, recipe = ModelConfig(**json.loads(sys.argv[1])), Recipe(**json.loads(sys.argv[2]))
out_dir, device = sys.argv[3], torch.device(sys.argv[4])
seen = {"train": set(), "encode": set()}
phase = "train"

def flags(*_):
    seen[phase].add((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

feats = np.random.default_rng(0).standard_normal((12, cfg.frames, cfg.feature_dim)).astype(np.float32)
torch.nn.modules.module.register_module_forward_hook(flags)
before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
train(feats, cfg, recipe, out_dir, device=str(device), progress=False)
phase = "encode"
torch.manual_seed(0)
model = ConMH(cfg).to(device)
encode_features(model, ArrayFeatures(feats), device)
after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
report = {"before": before, "after": after, **{k: sorted(v) for k, v in seen.items()}}
if device.type == "cuda":  # the encoder's pre-sign outputs as encoding computes them, against float64
    import copy
    from conmh.device import numerics
    x = torch.from_numpy(feats)
    exact = copy.deepcopy(model).double().cpu()
    with torch.no_grad():
        want = exact.ln(exact.binary(exact.encoder(x.double())))
        with numerics():
            got = model.ln(model.binary(model.encoder(x.to(device))))
    report["encoder_error"] = (got.double().cpu() - want).abs().max().item()
print(json.dumps(report))
"""


def run(cfg: ModelConfig, recipe: Recipe, out_dir: Path, device: str) -> dict:
    env = {**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "OMP_NUM_THREADS": "1"}
    args = [json.dumps(cfg.to_dict()), json.dumps(recipe.to_dict()), str(out_dir), device]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])
