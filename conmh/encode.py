"""Videos to binary codes (docs/reference.md §5), for a trained model and for the LSH and ITQ baselines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .checksums import file_sha256
from .codes import Codes, pack_bits
from .datasets import get_layout
from .errors import CheckpointError, ConfigError, DataError
from .features import FeatureFiles, open_split
from .labels import load_labels
from .presets import PAPER_PRESET

if TYPE_CHECKING:
    import torch

    from .model import ConMH

# torch is imported inside the functions that use it: the LSH baseline and the
# evaluation never need it, and importing it costs seconds per pipeline job.

# Training videos averaged to centre the LSH projection: enough for a stable
# mean, few enough that the baseline never reads a whole 168 GB training set.
LSH_MEAN_SAMPLES = 10_000

# Training videos ITQ is fitted on, evenly spaced over the training split. The
# covariance of 20,000 pooled videos pins down the top 64 of 4096 PCA directions
# well; reading them takes ~8 GB of FCVID's 19 GB (YFCC: 5% of its 168 GB, and
# ActivityNet's 9,722 are all used), and their pooled features hold ~330 MB
# (float32, 4096 dims) while the fit runs.
ITQ_TRAIN_SAMPLES = 20_000
# float64 elements per temporary block of the PCA fit (32 MB): X is converted
# to float64 a block of rows at a time, never whole.
_ITQ_BLOCK_ELEMENTS = 1 << 22


def encode_features(
    model: ConMH,
    feats: FeatureFiles,
    device: torch.device,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "encode",
) -> np.ndarray:
    """Bits (N, nbits) of every video: all frames visible, frame mean, sign (0 -> +1).

    In float32 without TF32 (``conmh.device.numerics``). The caller's model is
    left as it was: where it is not on ``device``, a copy encodes; its
    train/eval mode is restored.
    """
    import copy

    import torch

    from .device import numerics
    from .model import encode_bits

    if (feats.frames, feats.dim) != (model.cfg.frames, model.cfg.feature_dim):
        raise ConfigError(
            f"{feats.paths[0]}: key {feats.key!r} holds {feats.frames} frames x {feats.dim} dims, the model expects "
            f"{model.cfg.frames} x {model.cfg.feature_dim}"
        )
    where = next(model.parameters()).device
    on_device = where.type == device.type and device.index in (None, where.index)
    net = model if on_device else copy.deepcopy(model).to(device)
    was_training = net.training
    net.eval()
    out = np.empty((feats.n, model.cfg.nbits), dtype=bool)
    starts = range(0, feats.n, batch_size)
    try:
        with numerics(), torch.no_grad():
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
                stop = min(feats.n, start + batch_size)
                x = torch.from_numpy(feats.read(start, stop)).to(device)
                out[start:stop] = encode_bits(net.video_mean_codes(x)).cpu().numpy()
    finally:
        net.train(was_training)
    return out


def _with_labels(dataset: str, data_dir: Path, bits: int, method: str, encode, attrs: dict) -> Codes:
    """Encode the database (and separate queries) of ``dataset`` and attach their labels."""
    layout = get_layout(dataset, data_dir)
    with open_split(dataset, data_dir, "database") as db:
        database = pack_bits(encode(db, "database"))
    db_labels = load_labels(dataset, data_dir, "database")
    queries = query_labels = None
    if not layout.queries_are_database:
        with open_split(dataset, data_dir, "queries") as q:
            queries = pack_bits(encode(q, "queries"))
        query_labels = load_labels(dataset, data_dir, "queries")
        if query_labels.shape[1] != db_labels.shape[1]:
            q_file, q_key = layout.label_files("queries")[0]
            db_file, db_key = layout.label_files("database")[0]
            raise DataError(
                f"{data_dir / q_file}: key {q_key!r} has {query_labels.shape[1]} classes, but the database labels "
                f"({data_dir / db_file}, key {db_key!r}) have {db_labels.shape[1]}; they must share one class list"
            )
    return Codes(
        bits=bits,
        dataset=dataset,
        method=method,
        database=database,
        database_labels=db_labels,
        queries=queries,
        query_labels=query_labels,
        attrs=attrs,
    )


def encode_dataset(
    checkpoint: str | Path,
    dataset: str,
    data_dir: str | Path,
    *,
    bits: int | None = None,
    preset: str = PAPER_PRESET,
    device: str = "auto",
    batch_size: int = 1024,
    progress: bool = False,
) -> Codes:
    """Codes of a dataset's database and queries from a checkpoint (own or official).

    Official checkpoints do not record their architecture: give their ``bits``
    (and ``preset`` if not the paper's); files written by ``conmh train`` carry it.
    """
    from .device import select_device
    from .model import ModelConfig, load_checkpoint

    cfg = None
    if bits is not None:
        with open_split(dataset, data_dir, "database") as feats:
            cfg = ModelConfig.from_preset(preset, feature_dim=feats.dim, frames=feats.frames, nbits=bits)
    model = load_checkpoint(checkpoint, cfg=cfg)
    dev = select_device(device)
    attrs = {
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint": str(Path(checkpoint).name),
        "zero_mean_rule": "an exact 0 in the frame mean gives +1 (bit 1)",
    }

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        try:
            return encode_features(model, feats, dev, batch_size, progress, split)
        except ConfigError as exc:  # the features do not fit this checkpoint: name it too
            raise CheckpointError(f"{checkpoint}: checkpoint does not fit the data: {exc}") from None

    return _with_labels(dataset, Path(data_dir), model.cfg.nbits, "conmh", encode, attrs)


def lsh_projection(dim: int, bits: int, seed: int) -> np.ndarray:
    """Gaussian random hyperplanes (dim, bits), a function of the seed only."""
    return np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)


def lsh_codes(dataset: str, data_dir: str | Path, bits: int, seed: int = 1, batch_size: int = 512) -> Codes:
    """LSH baseline: sign of a random projection of the centred, mean-pooled features.

    Centred by the mean of (up to ``LSH_MEAN_SAMPLES`` evenly spaced) training
    videos, since CNN features are non-negative and uncentred hyperplanes
    would give nearly constant bits. Videos are read ``batch_size`` at a time
    (FCVID: 200 MB), so memory does not grow with the dataset.
    """
    if bits < 1:
        raise ConfigError(f"bits must be positive, got {bits}")
    data_dir = Path(data_dir)
    with open_split(dataset, data_dir, "train") as train:
        rows = np.unique(np.linspace(0, train.n - 1, min(train.n, LSH_MEAN_SAMPLES)).astype(np.int64))
        total = np.zeros(train.dim, dtype=np.float64)
        for start in range(0, len(rows), batch_size):
            total += train.take(rows[start : start + batch_size]).sum(axis=(0, 1), dtype=np.float64)
        centre = (total / (len(rows) * train.frames)).astype(np.float32)
        projection = lsh_projection(train.dim, bits, seed)

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        out = np.empty((feats.n, bits), dtype=bool)
        for start, block in feats.iter_blocks(batch_size):
            out[start : start + len(block)] = (block.mean(axis=1) - centre) @ projection >= 0
        return out

    return _with_labels(dataset, data_dir, bits, "lsh", encode, {"seed": seed})


# --------------------------------------------------------------------------- ITQ baseline


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


def itq_codes(
    dataset: str, data_dir: str | Path, bits: int, seed: int = 1, n_iter: int = 50, batch_size: int = 512
) -> Codes:
    """ITQ baseline: PCA and iterative quantization of the mean-pooled features (method "itq").

    Fitted (:func:`fit_itq`) on the mean-pooled features of up to
    ``ITQ_TRAIN_SAMPLES`` (20,000) evenly spaced training videos (all of them
    when there are fewer), so that a 168 GB training set is never read whole:
    centred by their mean, projected on their top ``bits`` principal
    directions, then rotated by ITQ (Gong and Lazebnik, CVPR 2011) from a
    random orthogonal start drawn from ``seed`` for ``n_iter`` iterations. The
    database and the queries are encoded as ``(pooled - mean) @ W >= 0`` (an
    exact 0 gives bit 1, as for LSH and ConMH). Frame means are summed in
    float64 and stored as float32; the fit and the projection run in float64.
    Videos are read ``batch_size`` at a time; memory holds the pooled training
    sample (~330 MB for FCVID) and one batch. The codes file's attributes
    record ``seed``, ``n_iter`` and ``train_videos`` (the number fitted on).
    Raises ConfigError when ``bits`` exceeds the feature dim (PCA keeps at
    most dim directions).
    """
    if bits < 1:
        raise ConfigError(f"bits must be positive, got {bits}")
    if n_iter < 0:
        raise ConfigError(f"ITQ iterations must be >= 0, got {n_iter}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    data_dir = Path(data_dir)
    with open_split(dataset, data_dir, "train") as train:
        if bits > train.dim:
            raise ConfigError(
                f"{dataset}: ITQ keeps at most as many PCA directions as feature dims, so bits must be <= "
                f"{train.dim} ({train.paths[0]}, key {train.key!r}: {train.dim}-dim features), got {bits}"
            )
        rows = np.unique(np.linspace(0, train.n - 1, min(train.n, ITQ_TRAIN_SAMPLES)).astype(np.int64))
        pooled = np.empty((len(rows), train.dim), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            pooled[start : start + batch_size] = _pool(train.take(rows[start : start + batch_size]))
        train_file, dim = train.paths[0], train.dim
    mean, projection = fit_itq(pooled, bits, seed=seed, n_iter=n_iter)
    del pooled

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        if feats.dim != dim:
            raise DataError(
                f"{feats.paths[0]}: key {feats.key!r} holds {feats.dim}-dim features, but the training features "
                f"({train_file}) have {dim}; the {split} must match them"
            )
        out = np.empty((feats.n, bits), dtype=bool)
        for start, block in feats.iter_blocks(batch_size):
            out[start : start + len(block)] = itq_bits(_pool(block), mean, projection)
        return out

    attrs = {"seed": seed, "n_iter": n_iter, "train_videos": len(rows)}
    return _with_labels(dataset, data_dir, bits, "itq", encode, attrs)
