"""Training: determinism, exact resume, the recipe's schedule, the log and the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conmh.errors import ConfigError
from conmh.features import FeatureFiles
from conmh.loader import ResidentBatches, StreamingBatches
from conmh.model import ModelConfig, encode_bits, load_checkpoint
from conmh.recipes import RECIPES, Recipe
from conmh.train import CHECKPOINT, FINAL_MODEL, LOG, train

CFG = ModelConfig(
    feature_dim=16,
    frames=6,
    nbits=8,
    hidden_size=32,
    encoder_depth=2,
    encoder_heads=2,
    decoder_dim=16,
    decoder_depth=1,
    decoder_heads=2,
)
RECIPE = Recipe(
    mask_ratio=0.5,
    batch_size=8,
    epochs=4,
    alpha=1.0,
    temperature=0.5,
    tau_plus=0.1,
    lr=1e-3,
    lr_step=1,
    lr_gamma=0.5,
    lr_min=3e-4,
)


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((28, 6, 16)).astype(np.float32)


def final_codes(out_dir: Path, feats: np.ndarray) -> np.ndarray:
    model = load_checkpoint(out_dir / FINAL_MODEL)
    return encode_bits(model.video_mean_codes(torch.from_numpy(feats))).numpy()


def final_state(out_dir: Path) -> dict:
    return torch.load(out_dir / FINAL_MODEL, weights_only=True)["model_state_dict"]


def assert_same_weights(run: Path, other: Path) -> None:
    """Every tensor of ``run``'s final model equals ``other``'s (each file read once)."""
    theirs = final_state(other)
    for k, v in final_state(run).items():
        assert torch.equal(v, theirs[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, feats) -> Path:
    out = tmp_path_factory.mktemp("full")
    train(feats, CFG, RECIPE, out, device="cpu", progress=False)
    return out


def test_same_seed_same_codes(tmp_path: Path, feats, uninterrupted: Path) -> None:
    train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False)
    np.testing.assert_array_equal(final_codes(tmp_path, feats), final_codes(uninterrupted, feats))
    assert_same_weights(tmp_path, uninterrupted)
    # byte-identical files, so checkpoint sha256s recorded downstream are reproducible
    assert (tmp_path / FINAL_MODEL).read_bytes() == (uninterrupted / FINAL_MODEL).read_bytes()


def test_resume_from_the_middle_gives_the_same_weights(tmp_path: Path, feats, uninterrupted: Path) -> None:
    first = train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, stop_after=2)
    assert first.epochs_done == 2 and first.final_model is None
    assert not (tmp_path / FINAL_MODEL).exists()
    second = train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, resume=True)
    assert second.epochs_done == 4
    assert_same_weights(tmp_path, uninterrupted)
    np.testing.assert_array_equal(final_codes(tmp_path, feats), final_codes(uninterrupted, feats))
    log = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3, 4]


def write_h5(path: Path, feats: np.ndarray) -> Path:
    with h5py.File(path, "w") as fh:
        fh["feats"] = feats
    return path


def test_hdf5_in_memory_equals_array(tmp_path: Path, feats, uninterrupted: Path) -> None:
    with FeatureFiles([write_h5(tmp_path / "train.h5", feats)]) as ff:
        train(ff, CFG, RECIPE, tmp_path / "run", device="cpu", progress=False, data_mode="memory")
    assert_same_weights(tmp_path / "run", uninterrupted)


def test_streaming_resume_is_exact(tmp_path: Path, feats, uninterrupted: Path) -> None:
    """Interrupted and resumed while streaming: the uninterrupted run's weights (streamed training equals
    in-memory training, the test below)."""
    with FeatureFiles([write_h5(tmp_path / "train.h5", feats)]) as ff:
        train(ff, CFG, RECIPE, tmp_path / "b", device="cpu", progress=False, data_mode="stream", stop_after=3)
        train(ff, CFG, RECIPE, tmp_path / "b", device="cpu", progress=False, data_mode="stream", resume=True)
    assert_same_weights(uninterrupted, tmp_path / "b")


def test_streamed_training_equals_in_memory_training(tmp_path: Path, feats, uninterrupted: Path) -> None:
    """Both sources draw the same uniform shuffle and the same sorted batches: identical weights."""
    with FeatureFiles([write_h5(tmp_path / "train.h5", feats)]) as ff:
        train(ff, CFG, RECIPE, tmp_path / "run", device="cpu", progress=False, data_mode="stream")
    assert_same_weights(tmp_path / "run", uninterrupted)


def test_activation_checkpointing_trains_the_same_weights(tmp_path: Path, feats, uninterrupted: Path) -> None:
    train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, activation_checkpointing=True)
    assert_same_weights(tmp_path, uninterrupted)


@pytest.mark.parametrize(("mode", "kept"), [("memory", True), ("stream", False)])
def test_freed_memory_is_kept_only_for_data_held_in_memory(
    tmp_path: Path, feats, monkeypatch: pytest.MonkeyPatch, mode: str, kept: bool
) -> None:
    from conmh import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    train(
        feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, data_mode=mode, stop_after=1, keep_freed_memory=True
    )
    assert bool(calls) == kept


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("source", ["array", "hdf5"])
def test_every_precision_data_mode_and_input_trains(
    tmp_path: Path, feats, precision: str, mode: str, source: str
) -> None:
    """A real training epoch (partial last batch included) for each combination; the log records it."""
    data = feats if source == "array" else FeatureFiles([write_h5(tmp_path / "train.h5", feats)])
    try:
        result = train(
            data,
            CFG,
            RECIPE,
            tmp_path / "run",
            device="cpu",
            progress=False,
            data_mode=mode,
            precision=precision,
            stop_after=1,
        )
    finally:
        if source == "hdf5":
            data.close()
    (entry,) = result.log
    assert entry["precision"] == precision and np.isfinite(entry["loss"])
    assert entry["videos_per_s"] * entry["seconds"] == pytest.approx(len(feats))  # every video, once


def test_data_plan_decides_residence_and_dtype() -> None:
    from conmh.device import DataPlan, plan_data

    gib = 1 << 30
    # The array held on the device has the compute dtype; auto is float32 everywhere.
    assert plan_data(gib, "cuda", "auto", free_device_bytes=80 * gib) == DataPlan(True, torch.float32)
    assert plan_data(gib, "cuda", "bf16", free_device_bytes=80 * gib) == DataPlan(True, torch.bfloat16)
    # FCVID's 18.7 GB: resident on an 80 GB GPU in fp32, streamed when half the free memory is too little.
    fcvid = 45_585 * 25 * 4096 * 4
    assert plan_data(fcvid, "cuda", "fp32", free_device_bytes=79 * gib).resident
    assert not plan_data(fcvid, "cuda", "fp32", free_device_bytes=30 * gib).resident
    assert plan_data(fcvid, "cuda", "bf16", free_device_bytes=30 * gib).resident  # half the bytes in bf16
    # CPU: held in RAM up to 4 GiB of the compute dtype.
    assert plan_data(4 * gib, "cpu", "fp32").resident and not plan_data(4 * gib + 4, "cpu", "fp32").resident
    assert plan_data(8 * gib, "cpu", "bf16") == DataPlan(True, torch.bfloat16)
    # An explicit mode wins.
    assert not plan_data(1, "cpu", "fp32", "stream").resident
    assert plan_data(fcvid, "cuda", "fp32", "memory", free_device_bytes=1).resident
    with pytest.raises(ConfigError, match="data mode"):
        plan_data(1, "cpu", "fp32", "disk")
    with pytest.raises(ValueError, match="free GPU memory"):
        plan_data(1, "cuda", "fp32")


def test_log_schedule_and_loss_decrease(uninterrupted: Path) -> None:
    log = [json.loads(line) for line in (uninterrupted / LOG).read_text().splitlines()]
    assert [e["lr"] for e in log] == [1e-3, 5e-4, 3e-4, 3e-4]  # step 1, gamma 0.5, floor 3e-4
    for e in log:
        assert set(e) >= {"epoch", "loss", "recon", "contrast", "lr", "seconds", "videos_per_s", "device", "world_size"}
        assert e["device"].startswith("cpu") and e["world_size"] == 1
        assert e["loss"] == pytest.approx(e["recon"] + RECIPE.alpha * e["contrast"], rel=1e-6)
        assert e["videos_per_s"] > 0
    assert log[-1]["loss"] < log[0]["loss"]


def test_checkpoint_and_final_model_contents(uninterrupted: Path) -> None:
    ckpt = torch.load(uninterrupted / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["arch"] == CFG.to_dict()
    assert "optimizer_state_dict" in ckpt
    final = torch.load(uninterrupted / FINAL_MODEL, weights_only=True)
    assert final["arch"] == CFG.to_dict() and final["epoch"] == 4
    assert not list(uninterrupted.glob(".*.tmp"))  # nothing half-written left behind


def test_existing_run_needs_resume_and_matching_recipe(tmp_path: Path, feats) -> None:
    train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, stop_after=1)
    with pytest.raises(ConfigError, match="--resume"):
        train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="recipe"):
        train(feats, CFG, RECIPE.replace(lr=5e-3), tmp_path, device="cpu", progress=False, resume=True)
    with pytest.raises(ConfigError, match="architecture"):
        train(
            feats,
            ModelConfig(**{**CFG.to_dict(), "nbits": 16}),
            RECIPE,
            tmp_path,
            device="cpu",
            progress=False,
            resume=True,
        )


def test_wrong_feature_shape_refused(tmp_path: Path, feats) -> None:
    with pytest.raises(ConfigError, match="6 frames x 16 dims"):
        train(
            feats, ModelConfig(**{**CFG.to_dict(), "feature_dim": 32}), RECIPE, tmp_path, device="cpu", progress=False
        )


def test_resident_batches_follow_seed_and_epoch(feats) -> None:
    data = ResidentBatches(feats, torch.device("cpu"))
    a = [x.numpy() for x in data.epoch(1, 7, 8)]
    b = [x.numpy() for x in data.epoch(1, 7, 8)]
    c = [x.numpy() for x in data.epoch(1, 8, 8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert [len(x) for x in a] == [8, 8, 8, 4]  # 28 videos: the last, partial batch is kept (official loader)
    seen = np.concatenate(a).reshape(28, -1)
    assert len({row.tobytes() for row in seen}) == 28  # every video once in an epoch


@pytest.mark.parametrize("world", [1, 2, 3, 5, 12, 16, 17, 40])
def test_data_parallel_shares_are_the_global_batches_split_as_data_parallel_splits_them(tmp_path, world) -> None:
    """Every global batch keeps its size, whatever the world size: the ranks' shares, in rank order, are the
    one-process batch, cut as torch.chunk cuts it (nn.DataParallel's split in the official code); every video
    of the epoch is seen once. (The old loader trimmed every batch to a multiple of the world size.)"""
    rows = np.arange(103, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    with FeatureFiles([write_h5(tmp_path / "a.h5", rows)]) as ff:
        for source in (ResidentBatches(rows, torch.device("cpu")), StreamingBatches(ff)):
            whole = [x[:, 0, 0].long() for x in source.epoch(1, 0, 16)]
            shares = [[x[:, 0, 0].long() for x in source.epoch(1, 0, 16, rank=r, world=world)] for r in range(world)]
            for step, batch in enumerate(whole):
                split = [shares[r][step] for r in range(world)]
                assert torch.equal(torch.cat(split), batch)
                chunks = batch.chunk(world)
                assert [len(x) for x in split] == [len(c) for c in chunks] + [0] * (world - len(chunks))
            assert sorted(torch.cat(whole).tolist()) == list(range(103))


def test_streaming_batches_are_a_uniform_shuffle_equal_to_resident_batches(tmp_path: Path) -> None:
    rows = np.arange(103, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    resident = ResidentBatches(rows, torch.device("cpu"))
    with FeatureFiles([write_h5(tmp_path / "a.h5", rows)]) as ff:
        stream = StreamingBatches(ff, prefetch=2)
        epoch = [x[:, 0, 0].numpy().astype(int) for x in stream.epoch(1, 0, 16)]
        again = [x[:, 0, 0].numpy().astype(int) for x in stream.epoch(1, 0, 16)]
        other = [x[:, 0, 0].numpy().astype(int) for x in stream.epoch(1, 1, 16)]
        assert [len(x) for x in epoch] == [16] * 6 + [7]  # the last, partial batch is kept
        assert sorted(np.concatenate(epoch).tolist()) == list(range(103))  # every video once
        assert all(np.array_equal(x, y) for x, y in zip(epoch, again))
        assert not all(np.array_equal(x, y) for x, y in zip(epoch, other))
        assert all(np.array_equal(x, np.sort(x)) for x in epoch)  # sorted rows: one ordered HDF5 read
        # the same batches as the array held in memory
        assert all(np.array_equal(x, y[:, 0, 0].numpy().astype(int)) for x, y in zip(epoch, resident.epoch(1, 0, 16)))
        # a numpy array streams the same way
        from_array = [x[:, 0, 0].numpy().astype(int) for x in StreamingBatches(rows).epoch(1, 0, 16)]
        assert all(np.array_equal(x, y) for x, y in zip(epoch, from_array))


def test_paper_recipes() -> None:
    assert RECIPES["fcvid"].lr_at(0) == 1e-4
    assert RECIPES["fcvid"].lr_at(20) == pytest.approx(9e-5)
    assert RECIPES["fcvid"].lr_at(799) == 1e-5  # 0.9^39 * 1e-4 < 1e-5: the floor
    assert (RECIPES["activitynet"].batch_size, RECIPES["activitynet"].epochs) == (128, 500)
    with pytest.raises(ConfigError, match="mask_ratio"):
        RECIPES["fcvid"].replace(mask_ratio=1.5)


def test_bf16_resident_batches_feed_a_training_step(feats) -> None:
    """The GPU path holds the array in bf16: same batches as float32, rounded, and a step runs on them."""
    from conmh.model import ConMH
    from conmh.train import epoch_generator, training_step

    f32 = ResidentBatches(feats, torch.device("cpu"))
    bf16 = ResidentBatches(feats, torch.device("cpu"), dtype=torch.bfloat16)
    for a, b in zip(f32.epoch(1, 0, 8), bf16.epoch(1, 0, 8)):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)
    x = next(iter(bf16.epoch(1, 0, 8)))
    torch.manual_seed(0)
    model = ConMH(CFG)  # float32 weights under bf16 autocast, as on CUDA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_step(model, x, RECIPE, epoch_generator(1, 0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_bf16_resident_from_hdf5_blocks(tmp_path: Path, feats) -> None:
    with FeatureFiles([write_h5(tmp_path / "t.h5", feats)]) as ff:
        data = ResidentBatches(ff, torch.device("cpu"), dtype=torch.bfloat16, block_rows=5)
    torch.testing.assert_close(data.array.float(), torch.from_numpy(feats).to(torch.bfloat16).float())


def test_precision_choice() -> None:
    from conmh.device import compute_precision

    assert compute_precision() == "fp32"  # auto: float32 on every device, as the official code
    assert compute_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        compute_precision("fp16")


def test_bf16_training_on_cpu_is_recorded_and_rounds_differently(tmp_path: Path, feats, uninterrupted: Path) -> None:
    train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, precision="bf16")
    log = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [e["precision"] for e in log] == ["bf16"] * RECIPE.epochs
    assert all(np.isfinite(e["loss"]) for e in log)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["meta"]["precision"] == "bf16"
    assert torch.load(tmp_path / FINAL_MODEL, weights_only=True)["meta"]["precision"] == "bf16"
    full = [json.loads(line) for line in (uninterrupted / LOG).read_text().splitlines()]
    assert full[0]["precision"] == "fp32"
    assert log[-1]["loss"] != full[-1]["loss"]  # the autocast really ran: other rounding, other trajectory
    assert abs(log[0]["loss"] - full[0]["loss"]) < 0.05 * full[0]["loss"]  # but the same training


def test_deterministic_mode_trains_the_same_weights_on_the_cpu(tmp_path: Path, feats, uninterrupted: Path) -> None:
    """Every op of a step runs under torch.use_deterministic_algorithms, and on the CPU nothing changes."""
    train(feats, CFG, RECIPE, tmp_path, device="cpu", progress=False, deterministic=True)
    ours, theirs = final_state(tmp_path), final_state(uninterrupted)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["meta"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
