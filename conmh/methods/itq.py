"""ITQ: PCA then iterative quantization of the mean-pooled features (Gong and Lazebnik, CVPR 2011;
docs/baselines.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..codes import Codes
from ..encode import encode_splits
from ..errors import ConfigError, DataError
from ..features import FeatureFiles, open_split
from . import check_bits, load_arrays, save_arrays

DISPLAY = "ITQ"

# Training videos ITQ is fitted on, evenly spaced over the training split. The
# covariance of 20,000 pooled videos pins down the top 64 of 4096 PCA directions
# well; reading them takes ~8 GB of FCVID's 19 GB (YFCC: 5% of its 168 GB, and
# ActivityNet's 9,722 are all used), and their pooled features hold ~330 MB
# (float32, 4096 dims) while the fit runs.
ITQ_TRAIN_SAMPLES = 20_000
# float64 elements per temporary block of the PCA fit (32 MB): X is converted
# to float64 a block of rows at a time, never whole.
_ITQ_BLOCK_ELEMENTS = 1 << 22


def _pool(block: np.ndarray) -> np.ndarray:
    """Mean over frames (N, T, D) -> (N, D), summed in float64 and stored as float32."""
    return block.mean(axis=1, dtype=np.float64).astype(np.float32)


def _block_rows(dim: int) -> int:
    """Rows per block that keep a float64 temporary of ``dim`` columns near ``_ITQ_BLOCK_ELEMENTS``."""
    return max(1, _ITQ_BLOCK_ELEMENTS // dim)


def _check_matrix(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be a non-empty 2-D numeric array (n, dim), got shape {X.shape} dtype {X.dtype}")
    return X


def pca_projection(X: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (dim,) and top-``bits`` principal directions (dim, bits) of the rows of ``X``, in float64.

    The directions are the eigenvectors of the covariance of the centred rows
    with the ``bits`` largest eigenvalues, in decreasing order; each is signed
    so that its largest-magnitude entry is positive (eigenvectors are defined up
    to sign, and this makes the result independent of the LAPACK build). ``X``
    is read a block of rows at a time: no float64 copy of it is made.
    """
    X = _check_matrix(X)
    n, dim = X.shape
    if not 1 <= bits <= dim:
        raise ValueError(f"PCA keeps at most dim = {dim} directions: bits must be in [1, {dim}], got {bits}")
    step = _block_rows(dim)
    mean = np.zeros(dim, dtype=np.float64)
    for start in range(0, n, step):
        mean += X[start : start + step].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((dim, dim), dtype=np.float64)
    for start in range(0, n, step):
        centred = X[start : start + step].astype(np.float64) - mean
        cov += centred.T @ centred
    cov /= n
    if not np.isfinite(cov).all():
        raise ValueError("X holds NaN or infinite values (or values too large to square)")
    _, vectors = np.linalg.eigh(cov)  # eigenvalues ascending
    top = np.ascontiguousarray(vectors[:, ::-1][:, :bits])
    signs = np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(bits)])
    return mean, top * signs


def itq_rotation(V: np.ndarray, seed: int = 1, n_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """ITQ's orthogonal rotation (bits, bits) of the projected data ``V`` (n, bits), and its losses.

    Iterative quantization (Gong and Lazebnik, "Iterative quantization: a
    Procrustean approach to learning binary codes", CVPR 2011) minimises the
    quantisation loss Q(B, R) = ||B - V R||_F^2 over codes B in {-1, +1}^(n x bits)
    and orthogonal R. It starts from a random orthogonal R, the Q factor of
    the QR decomposition of a standard Gaussian matrix drawn from
    ``numpy.random.default_rng(seed)`` (columns signed so that R's triangular
    factor has a positive diagonal: a uniformly random orthogonal matrix), then
    alternates ``n_iter`` times:

    * fix R, update B = sign(V R) (an exact 0 gives +1), the minimiser of Q over B;
    * fix B, update R by the orthogonal Procrustes problem: with the SVD
      B^T V = S Omega S_hat^T, R = S_hat S^T maximises trace(B^T V R).

    Neither step can increase Q. Returns R after the last update, in float64,
    and ``losses`` (n_iter + 1,): ``losses[t]`` = Q(sign(V R_t), R_t) for R_0 the
    start and R_t the rotation after t updates, a non-increasing sequence (up
    to rounding). Unlike the authors' MATLAB code, which makes ``n_iter + 1``
    updates and returns codes from the rotation before its last update, codes
    are meant to be sign(V R) with the returned R, which also encodes new data.
    """
    V = _check_matrix(V).astype(np.float64, copy=False)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    bits = V.shape[1]
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))
    R = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    losses = np.empty(n_iter + 1, dtype=np.float64)
    for t in range(n_iter + 1):
        Z = V @ R
        B = np.where(Z >= 0, 1.0, -1.0)
        losses[t] = np.sum((B - Z) ** 2)
        if t == n_iter:
            break
        S, _, S_hat_t = np.linalg.svd(B.T @ V)  # B^T V = S Omega S_hat^T
        R = S_hat_t.T @ S.T
    return R, losses


def fit_itq(X: np.ndarray, bits: int, seed: int = 1, n_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Fit ITQ on the rows of ``X`` (n, dim): the mean (dim,) and the projection W (dim, bits), float64.

    PCA to ``bits`` dimensions (:func:`pca_projection`: centre by the mean of
    the rows, top ``bits`` eigenvectors P of their covariance), then ITQ's
    rotation R of V = (X - mean) P (:func:`itq_rotation`, ``seed`` and
    ``n_iter``); W = P R. The codes of any x are ``(x - mean) @ W >= 0``
    (:func:`itq_bits`). Deterministic: the same X, bits, seed and n_iter give
    the same mean and W. ``bits`` must not exceed dim (ValueError).
    """
    X = _check_matrix(X)
    mean, P = pca_projection(X, bits)
    V = np.empty((X.shape[0], bits), dtype=np.float64)
    step = _block_rows(X.shape[1])
    for start in range(0, X.shape[0], step):
        V[start : start + step] = (X[start : start + step].astype(np.float64) - mean) @ P
    R, _ = itq_rotation(V, seed=seed, n_iter=n_iter)
    return mean, P @ R


def itq_bits(X: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Bits (n, bits) of the rows of ``X`` under a fit of :func:`fit_itq`: (x - mean) @ W >= 0, in float64."""
    return (np.asarray(X, dtype=np.float64) - mean) @ projection >= 0


def fit_state(
    dataset: str, data_dir: str | Path, bits: int, seed: int = 1, n_iter: int = 50, batch_size: int = 512
) -> dict:
    """ITQ fitted (:func:`fit_itq`) on the mean-pooled features of up to ``ITQ_TRAIN_SAMPLES`` (20,000)
    evenly spaced training videos (all of them when there are fewer), so that a 168 GB training set is
    never read whole: centred by their mean, projected on their top ``bits`` principal directions, then
    rotated by ITQ from a random orthogonal start drawn from ``seed`` for ``n_iter`` iterations. Frame
    means are summed in float64 and stored as float32; the fit runs in float64. Videos are read
    ``batch_size`` at a time; memory holds the pooled training sample (~330 MB for FCVID) and one batch.
    Raises ConfigError when ``bits`` exceeds the feature dim (PCA keeps at most dim directions).
    """
    if bits < 1:
        raise ConfigError(f"bits must be positive, got {bits}")
    if n_iter < 0:
        raise ConfigError(f"ITQ iterations must be >= 0, got {n_iter}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    with open_split(dataset, Path(data_dir), "train") as train:
        if bits > train.dim:
            raise ConfigError(
                f"{dataset}: ITQ keeps at most as many PCA directions as feature dims, so bits must be <= "
                f"{train.dim} ({train.paths[0]}, key {train.key!r}: {train.dim}-dim features), got {bits}"
            )
        rows = np.unique(np.linspace(0, train.n - 1, min(train.n, ITQ_TRAIN_SAMPLES)).astype(np.int64))
        pooled = np.empty((len(rows), train.dim), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            pooled[start : start + batch_size] = _pool(train.take(rows[start : start + batch_size]))
    mean, projection = fit_itq(pooled, bits, seed=seed, n_iter=n_iter)
    return {"mean": mean, "projection": projection, "seed": seed, "n_iter": n_iter, "train_videos": len(rows)}


def codes_of(state: dict, dataset: str, data_dir: str | Path, batch_size: int = 512) -> Codes:
    """Codes of the dataset under a fitted state: ``(pooled - mean) @ W >= 0`` (an exact 0 gives bit 1,
    as for LSH and ConMH), in float64, ``batch_size`` videos at a time. The codes file's attributes
    record ``seed``, ``n_iter`` and ``train_videos`` (the number fitted on)."""
    mean, projection = state["mean"], state["projection"]
    dim, bits = projection.shape

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        if feats.dim != dim:
            raise DataError(
                f"{feats.paths[0]}: key {feats.key!r} holds {feats.dim}-dim features, but ITQ was fitted on "
                f"{dim}-dim training features; the {split} must match them"
            )
        out = np.empty((feats.n, bits), dtype=bool)
        for start, block in feats.iter_blocks(batch_size):
            out[start : start + len(block)] = itq_bits(_pool(block), mean, projection)
        return out

    attrs = {k: int(state[k]) for k in ("seed", "n_iter", "train_videos")}
    return encode_splits(dataset, Path(data_dir), bits, "itq", encode, attrs)


def itq_codes(
    dataset: str, data_dir: str | Path, bits: int, seed: int = 1, n_iter: int = 50, batch_size: int = 512
) -> Codes:
    """Fit and encode in one go (``conmh itq``)."""
    state = fit_state(dataset, data_dir, bits, seed, n_iter, batch_size)
    return codes_of(state, dataset, data_dir, batch_size)


def fit(dataset: str, data_dir: str | Path, bits: int, model_file: str | Path, seed: int = 1, n_iter: int = 50) -> None:
    save_arrays(model_file, fit_state(dataset, data_dir, bits, seed, n_iter))


def encode(model_file: str | Path, dataset: str, data_dir: str | Path, bits: int, **_fit_options) -> Codes:
    state = load_arrays(model_file)
    check_bits(model_file, state["projection"].shape[1], bits)
    return codes_of(state, dataset, data_dir)
