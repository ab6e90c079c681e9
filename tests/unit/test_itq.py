"""The ITQ baseline (conmh.methods.itq): PCA and iterative quantization against a transcription of the paper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import conmh.methods.itq as itq
from conmh.cli import main
from conmh.codes import pack_bits, read_codes, unpack_bits
from conmh.errors import ConfigError
from conmh.features import open_split
from conmh.methods.itq import fit_itq, itq_bits, itq_codes, itq_rotation, pca_projection
from conmh.methods.lsh import lsh_projection
from conmh.metrics import map_at_k
from conmh.synthetic import make_miniature
from helpers.tiny import SPEC


def spread_data(seed: int, n: int = 300, dim: int = 20) -> np.ndarray:
    """Rows with well separated variances along random directions (a unique PCA basis), off-centre."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    scales = np.linspace(10.0, 1.0, dim)
    return (rng.standard_normal((n, dim)) * scales) @ basis.T + rng.uniform(2.0, 5.0, dim)


def clusters(seed: int, n: int = 600, dim: int = 64, k: int = 8, latent: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """k Gaussian clusters in a random ``latent``-dim subspace, plus isotropic noise in all ``dim`` dims."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0]
    centres = rng.standard_normal((k, latent)) * 3.0
    labels = np.arange(n) % k
    X = (centres[labels] + rng.standard_normal((n, latent))) @ basis.T + rng.standard_normal((n, dim)) + 5.0
    return X, np.eye(k, dtype=np.uint8)[labels]


def initial_rotation(bits: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))
    return q * np.sign(np.diag(r))


def paper_itq(V: np.ndarray, R: np.ndarray, n_iter: int) -> tuple[np.ndarray, list[float]]:
    """ITQ as the paper writes it: B = sgn(VR); SVD B^T V = S Omega S_hat^T, R = S_hat S^T.

    Returns the final R and the loss ||B - VR||_F^2 after every half-step (B update, then R update).
    """
    trace = []
    for _ in range(n_iter):
        B = np.where(V @ R >= 0, 1.0, -1.0)
        trace.append(float(np.linalg.norm(B - V @ R) ** 2))
        S, _, S_hat_t = np.linalg.svd(B.T @ V)
        R = S_hat_t.T @ S.T
        trace.append(float(np.linalg.norm(B - V @ R) ** 2))
    return R, trace


def test_pca_is_the_top_subspace_of_the_centred_data() -> None:
    X = spread_data(0)
    mean, P = pca_projection(X, 6)
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-12)
    _, _, vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    ref = vt[:6].T
    np.testing.assert_allclose(P @ P.T, ref @ ref.T, atol=1e-10)  # the same subspace
    np.testing.assert_allclose(np.abs(P.T @ ref), np.eye(6), atol=1e-10)  # the same directions, in order
    np.testing.assert_allclose(P.T @ P, np.eye(6), atol=1e-12)
    largest = np.argmax(np.abs(P), axis=0)
    assert (P[largest, np.arange(6)] > 0).all()  # the sign convention
    variances = ((X - mean) @ P).var(axis=0)
    assert (np.diff(variances) < 0).all()


def test_itq_matches_a_transcription_of_the_paper() -> None:
    X = spread_data(1)
    bits, seed, n_iter = 8, 5, 50
    mean, W = fit_itq(X, bits, seed=seed, n_iter=n_iter)
    # Independent PCA: SVD of the centred data, columns signed like pca_projection's.
    _, _, vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    P = vt[:bits].T
    P = P * np.sign(P[np.argmax(np.abs(P), axis=0), np.arange(bits)])
    V = (X - X.mean(axis=0)) @ P
    R, trace = paper_itq(V, initial_rotation(bits, seed), n_iter)
    np.testing.assert_allclose(W, P @ R, atol=1e-9)
    got_R, losses = itq_rotation(V, seed=seed, n_iter=n_iter)
    np.testing.assert_allclose(got_R, R, atol=1e-9)
    np.testing.assert_allclose(losses[:-1], trace[0::2], rtol=1e-9)
    np.testing.assert_array_equal(itq_bits(X, mean, W), V @ R >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantisation_loss_does_not_increase(seed: int) -> None:
    X, _ = clusters(seed)
    mean, P = pca_projection(X, 16)
    V = (X - mean) @ P
    _, trace = paper_itq(V, initial_rotation(16, seed), 30)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:]))  # each half-step, the paper's argument
    R, losses = itq_rotation(V, seed=seed, n_iter=30)
    assert (np.diff(losses) <= 1e-12 * losses[0]).all()
    assert losses[-1] < 0.95 * losses[0]  # and it does decrease (measured: by 8-11%)
    Z = V @ R
    assert losses[-1] == pytest.approx(np.sum((np.where(Z >= 0, 1.0, -1.0) - Z) ** 2), rel=1e-12)


@pytest.mark.parametrize("n_iter", [0, 1, 50])
def test_rotation_stays_orthogonal(n_iter: int) -> None:
    X, _ = clusters(3)
    mean, P = pca_projection(X, 16)
    R, losses = itq_rotation((X - mean) @ P, seed=4, n_iter=n_iter)
    assert R.shape == (16, 16) and losses.shape == (n_iter + 1,)
    np.testing.assert_allclose(R.T @ R, np.eye(16), atol=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(16), atol=1e-12)
    _, W = fit_itq(X, 16, seed=4, n_iter=n_iter)
    np.testing.assert_allclose(W.T @ W, np.eye(16), atol=1e-12)  # orthonormal PCA basis x rotation


def test_fit_is_deterministic_and_the_seed_only_rotates() -> None:
    X, _ = clusters(4)
    X32 = X.astype(np.float32)
    first, second = fit_itq(X32, 16, seed=7), fit_itq(X32, 16, seed=7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[1].dtype == np.float64
    other = fit_itq(X32, 16, seed=8)
    assert not np.allclose(first[1], other[1])  # another start, another rotation ...
    np.testing.assert_allclose(first[1] @ first[1].T, other[1] @ other[1].T, atol=1e-10)  # ... of one subspace


def test_an_exact_zero_gives_bit_one() -> None:
    X, _ = clusters(5)
    mean, W = fit_itq(X, 16)
    assert itq_bits(mean[None, :], mean, W).all()
    # In the fit too: a zero row of V is coded +1, a loss of 1 per bit (a sign of 0 would cost nothing).
    V = (X - mean) @ W
    R, losses = itq_rotation(V, seed=2, n_iter=5)
    R0, losses0 = itq_rotation(np.vstack([V, np.zeros((1, 16))]), seed=2, n_iter=5)
    np.testing.assert_allclose(R0, R, atol=1e-12)  # a zero row adds nothing to B^T V
    np.testing.assert_allclose(losses0, losses + 16, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_itq_beats_lsh_and_pca_with_a_random_rotation_on_clusters(seed: int) -> None:
    X, labels = clusters(seed)
    train, queries = slice(0, 400), slice(400, None)
    bits = 16

    def mean_ap(db: np.ndarray, q: np.ndarray) -> float:
        return map_at_k(pack_bits(db), labels[train], pack_bits(q), labels[queries], bits, ks=(20,))[20]

    mean, W = fit_itq(X[train], bits, seed=seed)
    itq = mean_ap(itq_bits(X[train], mean, W), itq_bits(X[queries], mean, W))
    centre, hyperplanes = X[train].mean(axis=0), lsh_projection(X.shape[1], bits, seed).astype(np.float64)
    lsh = mean_ap((X[train] - centre) @ hyperplanes >= 0, (X[queries] - centre) @ hyperplanes >= 0)
    mean0, W0 = fit_itq(X[train], bits, seed=seed, n_iter=0)  # PCA-RR: the start of ITQ
    pca_rr = mean_ap(itq_bits(X[train], mean0, W0), itq_bits(X[queries], mean0, W0))
    assert itq > lsh + 0.1  # measured: ITQ 0.60-0.96, LSH 0.21-0.46 over seeds 0-7
    assert itq > pca_rr + 0.02  # measured: a gain of 0.10-0.18


def test_fit_refuses_bad_arguments() -> None:
    X = spread_data(2, dim=10)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 10\], got 11"):
        fit_itq(X, 11)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        fit_itq(X, 4, n_iter=-1)
    with pytest.raises(ValueError, match="2-D"):
        fit_itq(X[0], 4)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_itq(bad, 4)


# --------------------------------------------------------------------------- on miniature datasets


@pytest.fixture(scope="module")
def fcvid(tmp_path_factory) -> Path:
    """An FCVID miniature of tiny_data's sizes: the queries are the database."""
    folder = tmp_path_factory.mktemp("itq") / "fcvid"
    make_miniature("fcvid", folder, seed=0, spec=SPEC)
    return folder


def pooled(data_dir: Path, split: str, rows: np.ndarray | None = None) -> np.ndarray:
    with open_split("activitynet", data_dir, split) as feats:
        x = feats.read(0, feats.n) if rows is None else feats.take(rows)
    return x.mean(axis=1, dtype=np.float64).astype(np.float32)


def test_codes_are_the_fit_on_the_pooled_training_features(tiny_data: Path) -> None:
    codes = itq_codes("activitynet", tiny_data, 16, seed=3, n_iter=20, batch_size=7)
    assert (codes.method, codes.bits, codes.dataset) == ("itq", 16, "activitynet")
    assert codes.attrs == {"seed": 3, "n_iter": 20, "train_videos": SPEC.n_train}
    mean, W = fit_itq(pooled(tiny_data, "train"), 16, seed=3, n_iter=20)
    np.testing.assert_array_equal(unpack_bits(codes.database, 16), itq_bits(pooled(tiny_data, "database"), mean, W))
    np.testing.assert_array_equal(unpack_bits(codes.queries, 16), itq_bits(pooled(tiny_data, "queries"), mean, W))
    assert codes.queries.shape == (SPEC.n_queries, 2) and codes.query_labels.shape == (SPEC.n_queries, 4)
    bits = unpack_bits(codes.database, 16)
    assert 0.2 < bits.mean() < 0.8 and (bits.mean(axis=0) > 0).all() and (bits.mean(axis=0) < 1).all()


def test_codes_do_not_depend_on_the_batch_size_and_are_deterministic(tiny_data: Path) -> None:
    a = itq_codes("activitynet", tiny_data, 16, batch_size=5)
    b = itq_codes("activitynet", tiny_data, 16, batch_size=512)
    c = itq_codes("activitynet", tiny_data, 16, batch_size=512)
    for x in (b, c):
        np.testing.assert_array_equal(a.database, x.database)
        np.testing.assert_array_equal(a.queries, x.queries)
    assert not np.array_equal(a.database, itq_codes("activitynet", tiny_data, 16, seed=2).database)


def test_training_is_capped_to_evenly_spaced_videos(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(itq, "ITQ_TRAIN_SAMPLES", 25)
    codes = itq_codes("activitynet", tiny_data, 8, batch_size=4)
    assert codes.attrs["train_videos"] == 25
    rows = np.linspace(0, SPEC.n_train - 1, 25).astype(np.int64)
    mean, W = fit_itq(pooled(tiny_data, "train", rows), 8)
    np.testing.assert_array_equal(unpack_bits(codes.queries, 8), itq_bits(pooled(tiny_data, "queries"), mean, W))
    everything = fit_itq(pooled(tiny_data, "train"), 8)
    assert not np.allclose(everything[1], W)  # the cap did change what the fit saw


def test_bits_above_the_feature_dim_is_a_config_error(tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match="bits must be <= 32"):
        itq_codes("activitynet", tiny_data, 33)
    with pytest.raises(ConfigError, match="iterations must be >= 0"):
        itq_codes("activitynet", tiny_data, 8, n_iter=-1)
    itq_codes("activitynet", tiny_data, 32, n_iter=2)  # bits = dim is allowed


def test_cli_writes_codes_that_evaluate_reads(fcvid: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "itq-16.h5"
    args = ["itq", "--dataset", "fcvid", "--data-dir", str(fcvid), "--bits", "16", "--out", str(out)]
    assert main([*args, "--seed", "4", "--iterations", "10"]) == 0
    assert "ITQ 16-bit codes" in capsys.readouterr().out
    codes = read_codes(out)
    assert (codes.method, codes.bits, codes.dataset, codes.queries_are_database) == ("itq", 16, "fcvid", True)
    assert codes.attrs == {"seed": 4, "n_iter": 10, "train_videos": SPEC.n_train}
    assert codes.database.shape == (SPEC.n_database, 2)
    direct = itq_codes("fcvid", fcvid, 16, seed=4, n_iter=10)
    np.testing.assert_array_equal(codes.database, direct.database)
    assert main(["evaluate", str(out), "--out", str(tmp_path / "itq-16.json")]) == 0
    metrics = json.loads((tmp_path / "itq-16.json").read_text())
    assert (metrics["method"], metrics["bits"], metrics["protocol"]) == ("itq", 16, "queries_are_database")
    assert all(0.0 < v <= 1.0 for v in metrics["map"].values())


def test_cli_refuses_more_bits_than_feature_dims(fcvid: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "itq-64.h5"
    args = ["itq", "--dataset", "fcvid", "--data-dir", str(fcvid), "--bits", "64", "--out", str(out)]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("conmh itq: error: ") and "bits must be <= 32" in err and "fcv_train_feats.h5" in err
    assert not out.exists()
    assert main([*args[:-3], "8", "--out", str(out), "--iterations", "-1"]) == 3
    assert not out.exists()
