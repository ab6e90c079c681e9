"""The ``download`` step: make every file of a dataset present in its folder.

* miniature: generate the seeded synthetic stand-in with
  ``conmh.synthetic.make_miniature`` (skipped when the folder already holds
  exactly what the manifest recorded for the same seed and sizes).
* real: the released features are on Baidu disk, which no script can fetch.
  Files already in the folder are used as they are; missing ones are fetched
  from configured mirror URLs (http, https or file://), resumably (a ``.part``
  file grows across attempts, HTTP Range requests), with a progress bar, and
  checked against configured sha256 sums. A file whose sum does not match is
  moved to ``<folder>/quarantine/`` and never used. When a file can be found
  nowhere, the step stops with the list of files to get, from where and where
  to put them (``MissingDataError``, exit code 4).

Both return the manifest (file names, sizes, sha256 where computed) that the
later steps depend on.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from ..atomic import commit
from ..checksums import file_sha256 as sha256_of
from ..datasets import DatasetLayout, get_layout
from ..errors import DataError, MissingDataError

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

    spec = replace(MINIATURE_DEFAULTS[dataset], **sizes)
    names = [f for _, f, _ in get_layout(dataset).all_files()]
    wanted = {"dataset": dataset, "source": "miniature", "seed": seed, "spec": asdict(spec)}
    old = read_manifest(manifest)
    if old and {k: old.get(k) for k in wanted} == wanted and _files_match(data_dir, old.get("files", [])):
        print(f"{dataset}: miniature in {data_dir} is up to date", file=sys.stderr)
        return old
    print(f"{dataset}: generating the miniature (seed {seed}, {spec}) in {data_dir}", file=sys.stderr)
    written = make_miniature(dataset, data_dir, seed=seed, spec=spec)
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


def fetch(url: str, dest: Path, *, progress: bool = True, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest``, continuing a previous partial ``dest.part``.

    HTTP(S) continues with a Range request (a server that ignores it restarts
    the file); file:// URLs continue by seeking. ``dest`` appears only complete.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    parsed = urlparse(url)
    if parsed.scheme == "file":
        src = Path(unquote(parsed.path))
        if not src.is_file():
            raise MissingDataError(f"mirror {url}: no such file")
        total = src.stat().st_size
        if have > total:
            have = 0
        with open(src, "rb") as fin, open(part, "ab" if have else "wb") as fout:
            fin.seek(have)
            _copy(fin, fout, have, total, dest.name, progress)
    else:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # the part is already complete
                commit(part, dest)
                return
            raise MissingDataError(f"mirror {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise MissingDataError(f"mirror {url}: cannot connect ({getattr(exc, 'reason', exc)})") from None
        with response:
            resumed = have and response.status == 206
            length = response.headers.get("Content-Length")
            total = (int(length) + (have if resumed else 0)) if length is not None else None
            with open(part, "ab" if resumed else "wb") as fout:
                _copy(response, fout, have if resumed else 0, total, dest.name, progress)
            if total is not None and part.stat().st_size != total:
                raise MissingDataError(
                    f"mirror {url}: transfer ended at {part.stat().st_size} of {total} bytes; "
                    "run the step again to continue"
                )
    commit(part, dest)


def _copy(fin, fout, start: int, total: int | None, name: str, progress: bool) -> None:
    with tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        desc=name,
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    ) as bar:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            bar.update(len(chunk))


def quarantine(path: Path, data_dir: Path) -> Path:
    """Move a file whose checksum is wrong out of the way (kept for inspection, never used)."""
    qdir = data_dir / "quarantine"
    qdir.mkdir(exist_ok=True)
    target = qdir / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(path), target)
    return target


def real(
    dataset: str, data_dir: Path, manifest: Path, mirrors: dict[str, str], sums: dict[str, str], progress: bool = True
) -> dict:
    """Make every file of the real release present and checked; return the manifest."""
    layout = get_layout(dataset)
    names = [f for _, f, _ in layout.all_files()]
    unknown = sorted((set(mirrors) | set(sums)) - set(names))
    if unknown:
        raise DataError(
            f"{dataset}: mirrors/sha256 name files that are not part of the release: {unknown}; "
            f"the release files are {names}"
        )
    old = {f["file"]: f for f in (read_manifest(manifest) or {}).get("files", []) if isinstance(f, dict)}
    files, missing, problems = [], [], []
    for name in names:
        path = data_dir / name
        entry = None
        if path.is_file():
            entry = _checked(path, sums.get(name), old.get(name, {}), data_dir, problems)
        if entry is None and name in mirrors:
            print(f"{dataset}: fetching {name} from {mirrors[name]}", file=sys.stderr, flush=True)
            try:
                fetch(mirrors[name], path, progress=progress)
            except MissingDataError as exc:
                problems.append(str(exc))
            else:
                entry = _checked(path, sums.get(name), {}, data_dir, problems)
        if entry is None:
            missing.append(name)
        else:
            files.append(entry)
    if missing:
        raise MissingDataError(instructions(dataset, data_dir, missing, layout, problems))
    return {"dataset": dataset, "source": "real", "data_dir": str(data_dir), "files": files}


def _checked(path: Path, expected: str | None, prev: dict, data_dir: Path, problems: list[str]) -> dict | None:
    """The manifest entry of ``path``, or None (and a problem noted) when its sha256 is wrong.

    A sum recorded in the previous manifest for the same size and mtime is
    reused, so that a rerun does not hash hundreds of GB again.
    """
    stat = path.stat()
    entry = {"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if expected:
        same = prev.get("bytes") == stat.st_size and prev.get("mtime_ns") == stat.st_mtime_ns
        digest = prev["sha256"] if same and prev.get("sha256") else sha256_of(path)
        if digest != expected:
            moved = quarantine(path, data_dir)
            problems.append(f"{path}: sha256 {digest} differs from the configured {expected}; moved to {moved}")
            return None
        entry["sha256"] = digest
    return entry


def instructions(dataset: str, data_dir: Path, missing: list[str], layout, problems: list[str]) -> str:
    """What to get, from where and where to put it."""
    width = max(len(n) for n in missing)
    lines = [f"{dataset}: {len(missing)} file(s) of the real dataset are missing from {data_dir}/:"]
    lines += [f"  {n.ljust(width)}  ({describe(layout, n)})" for n in missing]
    if problems:
        lines += ["Problems met on the way:"] + [f"  {p}" for p in problems]
    lines += [
        "How to get them: the features are published on Baidu disk only, which no script can fetch;",
        f"  see the ConMH repository README (huangmozhi9527/ConMH) for the Baidu disk links: {UPSTREAM}",
        f"  ({layout.name}: {layout.real_counts['train']} train / {layout.real_counts['database']} database videos, "
        f"{layout.frames} frames x {layout.feature_dim} dims).",
        "Then either",
        f"  - put the files in {data_dir}/ (or set {dataset}.data_dir to the folder that holds them), or",
        f"  - list mirror URLs in config.yaml, e.g. {dataset}: {{mirrors: {{{missing[0]}: https://...}}, "
        f"sha256: {{{missing[0]}: <sum>}}}},",
        f"and run the pipeline again. To run the synthetic stand-in instead, set {dataset}.source: miniature.",
    ]
    return "\n".join(lines)
