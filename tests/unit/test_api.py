"""The Python API: the README's example runs, and the array functions equal what the commands compute."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import conmh
from conmh.codes import pack_bits
from conmh.encode import encode_dataset, encode_features
from conmh.errors import CheckpointError, DataError
from conmh.features import ArrayFeatures, open_split
from conmh.model import ConMH, ModelConfig
from helpers import tiny

ROOT = Path(__file__).resolve().parents[2]


def _model(path: Path, feature_dim: int, frames: int, nbits: int = 16, official: bool = False) -> ConMH:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("mini", feature_dim=feature_dim, frames=frames, nbits=nbits)
    model = ConMH(cfg)
    blob = {"model_state_dict": model.state_dict()}
    if not official:
        blob["arch"] = cfg.to_dict()  # what `conmh train` records
    torch.save(blob, path)
    return model


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_the_readme_example_runs(tiny_model, tmp_path, monkeypatch, capsys):
    (tmp_path / "model.pt").symlink_to(tiny_model / "model.pt")  # "a checkpoint written by `conmh train`"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), scope)
    codes, bits = scope["codes"], scope["bits"]
    assert codes.dtype == np.uint8 and codes.shape == (200, 2) and bits == 16
    assert set(scope["maps"]) == {5, 20}
    neighbours, distances = scope["neighbours"], scope["distances"]
    assert neighbours.shape == distances.shape == (3, 5)
    # each video finds itself at distance 0, within the top 5 even with ties (ranked by index; it is among 0..2)
    assert not distances[:, 0].any() and all(i in neighbours[i] for i in range(3))
    assert "[" in capsys.readouterr().out


def test_encode_videos_gives_the_codes_of_conmh_encode(tiny_data, tiny_model):
    with open_split(tiny.DATASET, tiny_data, "database") as db:
        features = db.read(0, db.n)
    from_file = encode_dataset(tiny_model / "model.pt", tiny.DATASET, tiny_data, device="cpu")
    model = conmh.load_model(tiny_model / "model.pt")
    np.testing.assert_array_equal(conmh.encode_videos(model, features, device="cpu"), from_file.database)
    # in batches or at once: the same codes
    np.testing.assert_array_equal(conmh.encode_videos(model, features, device="cpu", batch_size=7), from_file.database)


def test_an_official_checkpoint_loads_with_its_bits_and_dataset(tmp_path):
    path = tmp_path / "official.pth"
    reference = _model(path, feature_dim=2048, frames=30, nbits=32, official=True)
    with pytest.raises(CheckpointError, match="does not record its architecture"):
        conmh.load_model(path)
    with pytest.raises(ValueError, match="needs bits and either dataset"):
        conmh.load_model(path, bits=32)
    model = conmh.load_model(path, bits=32, dataset="activitynet", preset="mini")  # ActivityNet: 30 x 2048
    assert model.cfg == reference.cfg
    x = np.random.default_rng(0).random((4, 30, 2048), dtype=np.float32)
    expected = pack_bits(encode_features(reference, ArrayFeatures(x), torch.device("cpu")))
    np.testing.assert_array_equal(conmh.encode_videos(model, x, device="cpu"), expected)


@pytest.mark.parametrize(
    "features, problem",
    [
        (np.zeros((4, 6)), "must be \\(videos, frames, dims\\)"),
        (np.zeros((0, 6, 32)), "must be \\(videos, frames, dims\\)"),
        (np.full((2, 6, 32), np.nan), "NaN or infinite"),
        (np.zeros((2, 6, 32), dtype=complex), "real numbers"),
    ],
)
def test_bad_arrays_are_refused(features, problem):
    with pytest.raises(DataError, match=problem):
        ArrayFeatures(features)


def test_features_that_do_not_fit_the_model_are_refused(tmp_path):
    model = _model(tmp_path / "model.pt", feature_dim=32, frames=6)
    with pytest.raises(conmh.errors.ConfigError, match="holds 6 frames x 31 dims, the model expects 6 x 32"):
        conmh.encode_videos(model, np.zeros((2, 6, 31), np.float32), device="cpu")


def test_every_api_name_resolves():
    for name in conmh.__all__:
        assert getattr(conmh, name) is not None, name


def test_import_conmh_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, conmh; conmh.map_at_k; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
