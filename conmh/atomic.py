"""Atomic file writes: write to a temporary name beside the target, flush,
fsync, then rename. A reader never sees a half-written file; a crash leaves
at most a stray hidden ``.NAME.PID.tmp`` beside the target, which nothing
reads (``conmh train`` removes its own at start-up)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``target`` to; rename it into place on success.

    The caller writes (and closes) the file at the yielded path. On an
    exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        commit(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def commit(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """fsync ``tmp``, rename it to ``target``, fsync the folder: the last step of every atomic write.

    Used directly only where the temporary file must outlive a failure (a
    resumable download's ``.part``).
    """
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(Path(target).parent)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_if_changed(target: str | os.PathLike, text: str) -> bool:
    """Write ``text`` atomically unless ``target`` already holds it; True when written.

    An unchanged file keeps its mtime, so that Snakemake does not rerun what depends on it.
    """
    target = Path(target)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if target.read_text(encoding="utf-8") == text:
            return False
    write_text_atomic(target, text)
    return True
