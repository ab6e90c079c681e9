"""Format-faithful miniature datasets for tests and the CPU pipeline.

A miniature has the official release's file names, keys, frame counts and
split layout (docs/reference.md §2: YFCC's nine training parts and two database
parts, ActivityNet's separate queries, FCVID's queries = database), but few
videos and a small feature dim, so the whole pipeline runs in minutes on CPU.

The features are built so that retrieval is learnable but not trivial:

* each class walks through a few prototype *states* in a small latent space;
  a video follows its class's path with a random start and speed, so classes
  differ by their states **and** their temporal order (some classes come in
  pairs that visit the same states in reverse order: mean pooling cannot tell
  them apart, a temporal model can);
* a strong *nuisance* shared by all classes (camera, lighting, scene) is
  added along common directions: a per-video offset plus a much larger,
  temporally correlated per-frame part. Even after mean pooling it rivals the
  class signal, so a random projection (LSH) or PCA spends many bits on it,
  while a model that matches two disjoint sets of frames of one video and
  reconstructs masked frames learns to discount the per-frame part;
* frames are mapped to D dims by a fixed random linear map and a ReLU (CNN
  fc7 / pooled features are non-negative), with per-frame noise.

FCVID and YFCC miniatures have some multi-label videos (their signal mixes two
classes); YFCC also has a few videos without any class, like the real data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from conmh.atomic import atomic_path
from conmh.datasets import DATASETS, FEATURE_KEY, get_layout
from conmh.errors import ConfigError
from conmh.generic import write_features, write_labels


@dataclass(frozen=True)
class MiniatureSpec:
    """Sizes of a miniature dataset. For FCVID, queries are the database and ``n_queries`` is ignored."""

    n_train: int
    n_database: int
    n_queries: int
    feature_dim: int
    n_classes: int


# Sized for the CPU pipeline: generation takes well under a second per dataset,
# and ConMH "mini" trains at roughly 200 videos per CPU-second here.
MINIATURE_DEFAULTS: dict[str, MiniatureSpec] = {
    "fcvid": MiniatureSpec(n_train=800, n_database=400, n_queries=400, feature_dim=256, n_classes=16),
    "activitynet": MiniatureSpec(n_train=600, n_database=300, n_queries=100, feature_dim=128, n_classes=12),
    "yfcc": MiniatureSpec(n_train=900, n_database=400, n_queries=100, feature_dim=256, n_classes=12),
}


@dataclass(frozen=True)
class _Style:
    """How a dataset's videos are drawn (label structure and signal strengths)."""

    multi_label: float  # fraction of labelled videos with a second class
    unlabelled: float  # fraction of videos with no class at all
    latent: int = 16  # dims of the class subspace
    states: int = 4  # prototype states per class path
    nuisance_dirs: int = 8  # common nuisance directions
    class_scale: float = 1.0  # spread of the class states
    video_nuisance: float = 0.6  # per-video nuisance offset (constant over frames)
    frame_nuisance: float = 4.5  # per-frame nuisance (AR(1) over frames)
    frame_rho: float = 0.5  # AR(1) correlation of the per-frame nuisance
    frame_noise: float = 0.3  # i.i.d. noise per frame and feature dim
    reversed_pairs: float = 0.5  # fraction of classes that come in state-sharing, order-reversed pairs


# Calibrated on seed 0 (mAP@20, 64 bits): centred LSH of mean-pooled features
# 0.37-0.44, an untrained ConMH ~0.24, ConMH "mini" after 4 epochs (lr 1e-3,
# batch 64) ~0.61-0.63; with every class in a reversed pair, 4 epochs are not
# enough to beat LSH, hence half of them.
_STYLES: dict[str, _Style] = {
    "fcvid": _Style(multi_label=0.15, unlabelled=0.0),
    "activitynet": _Style(multi_label=0.0, unlabelled=0.0),
    "yfcc": _Style(multi_label=0.3, unlabelled=0.03),
}


class _World:
    """The fixed generative parameters of one miniature (class paths, nuisance, feature map)."""

    def __init__(self, rng: np.random.Generator, style: _Style, n_classes: int, dim: int) -> None:
        self.style = style
        L, S = style.latent, style.states
        centres = rng.normal(0.0, style.class_scale, (n_classes, 1, L))
        offsets = rng.normal(0.0, style.class_scale, (n_classes, S, L))
        states = centres + offsets
        # Classes 0/1, 2/3, ...: the second of a pair walks the first's states backwards.
        for c in range(0, int(n_classes * style.reversed_pairs) // 2 * 2, 2):
            states[c + 1] = states[c, ::-1]
        self.states = states  # (C, S, L)
        latent_total = L + style.nuisance_dirs
        self.proj = rng.normal(0.0, 1.0 / np.sqrt(latent_total), (latent_total, dim))
        self.bias = rng.normal(-0.2, 0.2, dim)

    def class_paths(self, labels: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
        """Class signal (N, T, L): each video walks its classes' state paths with random start/speed."""
        n, S = labels.shape[0], self.style.states
        start = rng.uniform(0.0, 0.3, (n, 1))
        span = rng.uniform(0.6, 1.0, (n, 1)) * (1.0 - start)
        progress = (start + span * np.linspace(0.0, 1.0, frames)) * (S - 1)  # (N, T) in [0, S-1]
        lo = np.minimum(np.floor(progress).astype(int), S - 2)
        w = (progress - lo)[..., None]
        counts = labels.sum(axis=1, keepdims=True)
        weights = labels / np.maximum(counts, 1)  # multi-label: the classes' paths are averaged
        out = np.zeros((n, frames, self.style.latent))
        for c in range(self.states.shape[0]):
            rows = np.flatnonzero(labels[:, c])
            if rows.size:
                path = (1 - w[rows]) * self.states[c, lo[rows]] + w[rows] * self.states[c, lo[rows] + 1]
                out[rows] += weights[rows, c, None, None] * path
        unlabelled = np.flatnonzero(counts[:, 0] == 0)
        if unlabelled.size:  # background videos: a random point in the class space
            out[unlabelled] = rng.normal(0.0, self.style.class_scale, (unlabelled.size, 1, self.style.latent))
        return out

    def videos(self, labels: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
        """Features (N, T, D) float32 of videos with the given (N, C) labels."""
        st = self.style
        n = labels.shape[0]
        signal = self.class_paths(labels, frames, rng)
        per_video = rng.normal(0.0, st.video_nuisance, (n, 1, st.nuisance_dirs))
        # Stationary AR(1) over frames: std frame_nuisance at every frame, correlation frame_rho.
        innov = rng.normal(0.0, st.frame_nuisance * np.sqrt(1 - st.frame_rho**2), (n, frames, st.nuisance_dirs))
        per_frame = np.empty_like(innov)
        per_frame[:, 0] = rng.normal(0.0, st.frame_nuisance, (n, st.nuisance_dirs))
        for t in range(1, frames):
            per_frame[:, t] = st.frame_rho * per_frame[:, t - 1] + innov[:, t]
        nuisance = per_video + per_frame
        latent = np.concatenate([signal, nuisance], axis=2)
        pre = latent @ self.proj + self.bias
        pre += rng.normal(0.0, st.frame_noise, pre.shape)
        return np.maximum(pre, 0.0).astype(np.float32)


def _draw_labels(rng: np.random.Generator, n: int, n_classes: int, style: _Style) -> np.ndarray:
    """(n, C) uint8 labels: one class each (balanced), a second for some, none for a few."""
    labels = np.zeros((n, n_classes), dtype=np.uint8)
    first = rng.permutation(np.arange(n) % n_classes)
    labels[np.arange(n), first] = 1
    multi = np.flatnonzero(rng.random(n) < style.multi_label)
    second = (first[multi] + rng.integers(1, n_classes, multi.size)) % n_classes
    labels[multi, second] = 1
    labels[rng.random(n) < style.unlabelled] = 0
    return labels


def _check_spec(name: str, spec: MiniatureSpec) -> None:
    layout = get_layout(name)
    minimum = {
        "n_train": len(layout.train),
        "n_database": len(layout.database),
        "n_queries": 1,
        "feature_dim": 1,
        "n_classes": 2,
    }
    for field, low in minimum.items():
        if getattr(spec, field) < low:
            raise ConfigError(f"miniature {name}: {field} = {getattr(spec, field)} must be >= {low}")


def make_miniature(
    name: str, out_dir: str | os.PathLike, *, seed: int = 0, spec: MiniatureSpec | None = None
) -> list[Path]:
    """Write a miniature of dataset ``name`` into ``out_dir`` with the official layout; return the paths.

    Deterministic: the same name, seed and spec give identical arrays.
    """
    layout = get_layout(name)
    spec = spec or MINIATURE_DEFAULTS[name]
    _check_spec(name, spec)
    style = _STYLES[name]
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, DATASETS.index(name)])
    world = _World(rng, style, spec.n_classes, spec.feature_dim)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = _draw_labels(rng, n, spec.n_classes, style)
        return world.videos(labels, layout.frames, rng), labels

    written: list[Path] = []

    def write_parts(files: tuple[str, ...], feats: np.ndarray) -> None:
        for fname, part in zip(files, np.array_split(feats, len(files))):
            write_features(out_dir / fname, part)
            written.append(out_dir / fname)

    def write_label_parts(files: tuple[tuple[str, str], ...], labels: np.ndarray) -> None:
        for (fname, key), part in zip(files, np.array_split(labels, len(files))):
            write_labels(out_dir / fname, key, part)
            written.append(out_dir / fname)

    train, _ = split(spec.n_train)
    write_parts(layout.train, train)
    database, db_labels = split(spec.n_database)
    write_parts(layout.database, database)
    write_label_parts(layout.database_labels, db_labels)
    if layout.queries is not None and layout.query_labels is not None:
        queries, q_labels = split(spec.n_queries)
        write_parts(layout.queries, queries)
        write_label_parts(layout.query_labels, q_labels)
    return written


# --------------------------------------------------------------------------- release-sized stand-ins

# Class counts of the real releases (FCVID: 239 categories; ActivityNet v1.3: 200
# activity classes). YFCC has none here: at 168 GB it is out of a CPU rehearsal's reach.
RELEASE_CLASSES: dict[str, int] = {"fcvid": 239, "activitynet": 200}
# Videos generated and written per step: about 210 MB of FCVID features, ~1 GB of
# temporaries while drawing them (float64).
RELEASE_BLOCK = 512
# Distinguishes the release-sized streams from the miniatures' ([seed, dataset]).
_RELEASE_STREAM = 7


def release_spec(name: str, scale: float = 1.0, feature_dim: int | None = None) -> MiniatureSpec:
    """Sizes of a release-sized stand-in: the release's counts x ``scale`` (rounded), dim and class count.

    ``feature_dim`` replaces the release's dim (small test runs only). For FCVID
    ``n_queries`` equals ``n_database`` (its queries are the database).
    """
    layout = get_layout(name)
    if name not in RELEASE_CLASSES:
        raise ConfigError(f"no release-sized stand-in for {name!r}; available: {', '.join(RELEASE_CLASSES)}")
    if not 0 < scale <= 1:
        raise ConfigError(f"release-sized {name}: scale = {scale} must be in (0, 1]")
    counts = {split: max(1, round(n * scale)) for split, n in layout.real_counts.items()}
    spec = MiniatureSpec(
        n_train=counts["train"],
        n_database=counts["database"],
        n_queries=counts["queries"],
        feature_dim=layout.feature_dim if feature_dim is None else feature_dim,
        n_classes=RELEASE_CLASSES[name],
    )
    _check_spec(name, spec)
    return spec


def make_release_sized(
    name: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    scale: float = 1.0,
    feature_dim: int | None = None,
    block: int = RELEASE_BLOCK,
) -> list[Path]:
    """Write a stand-in of release ``name`` with its official files, counts and class count; return the paths.

    The features follow the miniatures' model (``_World``), but nothing is held
    whole: each HDF5 dataset is created with its full shape (contiguous
    float32, like the releases) and filled ``block`` videos at a time, so that
    FCVID's two 19 GB files are written in about 1 GB of memory. Every block
    draws from its own random stream, a function of (seed, split, block index):
    the same arguments give identical files.
    """
    layout = get_layout(name)
    spec = release_spec(name, scale, feature_dim)
    if block < 1:
        raise ConfigError(f"release-sized {name}: block = {block} must be >= 1")
    style = _STYLES[name]
    out_dir = Path(out_dir)
    # Entropy lists never end in 0: numpy's SeedSequence treats [a, 0] like [a].
    base = [seed, DATASETS.index(name) + 1, _RELEASE_STREAM]
    world = _World(np.random.default_rng(base), style, spec.n_classes, spec.feature_dim)
    splits = [(layout.train, (), spec.n_train), (layout.database, layout.database_labels, spec.n_database)]
    if layout.queries is not None and layout.query_labels is not None:
        splits.append((layout.queries, layout.query_labels, spec.n_queries))
    written: list[Path] = []
    for s, (files, label_files, n) in enumerate(splits, start=1):
        # FCVID and ActivityNet keep each split in one file (and its labels in one .mat).
        (fname,) = files
        labels = _draw_labels(np.random.default_rng(base + [s]), n, spec.n_classes, style)
        with atomic_path(out_dir / fname) as tmp:
            with h5py.File(tmp, "w") as fh:
                ds = fh.create_dataset(FEATURE_KEY, shape=(n, layout.frames, spec.feature_dim), dtype=np.float32)
                for b, lo in enumerate(range(0, n, block), start=1):
                    hi = min(n, lo + block)
                    ds[lo:hi] = world.videos(labels[lo:hi], layout.frames, np.random.default_rng(base + [s, b]))
        written.append(out_dir / fname)
        for label_file, key in label_files:
            write_labels(out_dir / label_file, key, labels)
            written.append(out_dir / label_file)
    return written
