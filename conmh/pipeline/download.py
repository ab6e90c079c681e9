"""The ``download`` step: make sure every file of a dataset is in its folder, and record it.

* a miniature (``fcvid-mini``): generate the seeded synthetic stand-in with
  ``conmh.synthetic.make_miniature`` (skipped when the folder already holds
  exactly what the manifest recorded for the same seed and sizes).
* a release (``fcvid``): the released features are on Baidu disk, which no
  script can fetch; the user puts them in ``data/<dataset>/`` (by hand, a link,
  ``dvc add``, or ``dvc import-url`` from a lab's own mirror: docs/pipeline.md). The step checks
  that every file is there and, where configured, its sha256. A missing file
  stops it with the list of files to get, from where and where to put them
  (``MissingDataError``, exit code 4); a wrong sum names the file and both sums.

Both return the manifest (file names, sizes, sha256 where computed) that the
later steps depend on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checksums import file_sha256 as sha256_of
from ..datasets import DatasetLayout, get_layout
from ..errors import DataError, MissingDataError
from .config import layout_of

UPSTREAM = "https://github.com/huangmozhi9527/ConMH"
CHUNK = 1 << 20


def read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(layout: DatasetLayout, name: str) -> str:
    """What a file of the release holds, for the instructions (counts from docs/reference.md §2)."""
    for split, fname, key in layout.all_files():
        if fname == name:
            what = split if split.endswith("labels") else f"{split} features"
            return f"{what}, key {key!r}"
    return "?"


# --------------------------------------------------------------------------- miniature


def miniature(dataset: str, data_dir: Path, manifest: Path, seed: int, sizes: dict[str, int]) -> dict:
    """Generate (or keep) the miniature and return its manifest."""
    from dataclasses import asdict, replace

    from ..synthetic import MINIATURE_DEFAULTS, make_miniature

    layout = layout_of(dataset)
    spec = replace(MINIATURE_DEFAULTS[layout], **sizes)
    names = [f for _, f, _ in get_layout(layout).all_files()]
    wanted = {"dataset": dataset, "source": "miniature", "seed": seed, "spec": asdict(spec)}
    old = read_manifest(manifest)
    if old and {k: old.get(k) for k in wanted} == wanted and _files_match(data_dir, old.get("files", [])):
        print(f"{dataset}: miniature in {data_dir} is up to date", file=sys.stderr)
        return old
    print(f"{dataset}: generating the miniature (seed {seed}, {spec}) in {data_dir}", file=sys.stderr)
    written = make_miniature(layout, data_dir, seed=seed, spec=spec)
    missing = sorted(set(names) - {p.name for p in written})
    if missing:
        raise DataError(f"{dataset}: make_miniature did not write {missing}")
    files = [{"file": n, "bytes": (data_dir / n).stat().st_size, "sha256": sha256_of(data_dir / n)} for n in names]
    return {**wanted, "data_dir": str(data_dir), "files": files}


def _files_match(data_dir: Path, files: list[dict]) -> bool:
    try:
        return bool(files) and all(
            (data_dir / f["file"]).stat().st_size == f["bytes"] and sha256_of(data_dir / f["file"]) == f["sha256"]
            for f in files
        )
    except (OSError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- real data


def real(dataset: str, data_dir: Path, manifest: Path, sums: dict[str, str]) -> dict:
    """Check that every file of the real release is present (and matches its configured sha256); return the
    manifest."""
    layout = get_layout(dataset)
    names = [f for _, f, _ in layout.all_files()]
    unknown = sorted(set(sums) - set(names))
    if unknown:
        raise DataError(
            f"{dataset}: sha256 names files that are not part of the release: {unknown}; the release files are {names}"
        )
    old = {f["file"]: f for f in (read_manifest(manifest) or {}).get("files", []) if isinstance(f, dict)}
    missing = [name for name in names if not (data_dir / name).is_file()]
    if missing:
        raise MissingDataError(instructions(dataset, data_dir, missing, layout))
    files = [_checked(data_dir / name, sums.get(name), old.get(name, {})) for name in names]
    return {"dataset": dataset, "source": "real", "data_dir": str(data_dir), "files": files}


def _checked(path: Path, expected: str | None, prev: dict) -> dict:
    """The manifest entry of ``path``; a DataError when its sha256 is not the configured one.

    A sum recorded in the previous manifest for the same size and mtime is
    reused, so that a rerun does not hash hundreds of GB again.
    """
    stat = path.stat()
    entry = {"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if expected:
        same = prev.get("bytes") == stat.st_size and prev.get("mtime_ns") == stat.st_mtime_ns
        digest = prev["sha256"] if same and prev.get("sha256") else sha256_of(path)
        if digest != expected:
            raise DataError(
                f"{path}: sha256 {digest} differs from the configured {expected}: a damaged or different file; "
                "get it again (or correct the configured sum)"
            )
        entry["sha256"] = digest
    return entry


def instructions(dataset: str, data_dir: Path, missing: list[str], layout) -> str:
    """What to get, from where and where to put it."""
    width = max(len(n) for n in missing)
    lines = [f"{dataset}: {len(missing)} file(s) of the real dataset are missing from {data_dir}/:"]
    lines += [f"  {n.ljust(width)}  ({describe(layout, n)})" for n in missing]
    lines += [
        "How to get them: the features are published on Baidu disk only, which no script can fetch;",
        f"  see the ConMH repository README (huangmozhi9527/ConMH) for the Baidu disk links: {UPSTREAM}",
        f"  ({layout.name}: {layout.real_counts['train']} train / {layout.real_counts['database']} database videos, "
        f"{layout.frames} frames x {layout.feature_dim} dims).",
        "Then either",
        f"  - put the files in {data_dir}/ (or make {data_dir} a link to the folder that holds them), or",
        f"  - fetch them from your lab's own copy with `dvc import-url URL {data_dir}/FILE` (docs/pipeline.md),",
        f"and run the pipeline again. To run the synthetic stand-in instead, list {dataset}-mini in datasets.",
    ]
    return "\n".join(lines)
