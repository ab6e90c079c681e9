"""Streaming loader: peak memory must not grow with the dataset, and the loader must outrun training.

The streaming loader reads a uniform shuffle of the whole training set, one
batch at a time (sorted point selections in HDF5), in a background thread.
For each size (default 1 and 8 GB) it writes a float32 ``feats`` HDF5 file of
FCVID's shape (T=25, D=4096) once, then in a fresh process each:

* loader only, warm: one full epoch of ``StreamingBatches`` (batch 512), the
  file in the page cache;
* loader only, cold: the same after dropping the page cache (root only;
  skipped elsewhere), so every row comes from the disk;
* training: ``--steps`` training steps of the ``small`` preset fed by the
  streaming loader (batch ``--train-batch``), in a process set up as
  ``conmh train`` sets it up (glibc keeps freed memory; ``--default-allocator``
  leaves glibc's defaults).

and reports videos/s and the process's peak RSS (``ru_maxrss``, which counts
the process's own memory, not the page cache).

    python benchmarks/bench_loader.py [--sizes 1,8] [--workdir /tmp/conmh-bench] [--out loader.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

FRAMES, DIM = 25, 4096


def make_file(path: Path, gigabytes: float) -> int:
    n = int(gigabytes * 1e9 / (FRAMES * DIM * 4))
    if path.exists():
        with h5py.File(path, "r") as fh:
            if fh["feats"].shape[0] == n:
                return n
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as fh:
        ds = fh.create_dataset("feats", shape=(n, FRAMES, DIM), dtype="float32")
        for start in range(0, n, 512):
            stop = min(n, start + 512)
            ds[start:stop] = rng.random((stop - start, FRAMES, DIM), dtype=np.float32)
    tmp.rename(path)
    return n


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root); False where that is not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(mode: str, path: str, steps: int, batch: int, threads: int, default_allocator: bool) -> None:
    import torch

    from conmh.allocator import keep_freed_memory

    if mode == "train" and not default_allocator:
        keep_freed_memory()

    from conmh.features import FeatureFiles
    from conmh.loader import StreamingBatches
    from conmh.model import ConMH, ModelConfig
    from conmh.recipes import RECIPES
    from conmh.train import epoch_generator, training_step

    torch.set_num_threads(threads)
    with FeatureFiles([path]) as ff:
        stream = StreamingBatches(ff)
        videos, tic = 0, time.perf_counter()
        if mode.startswith("loader"):
            for x in stream.epoch(1, 0, 512):
                videos += len(x)
        else:
            recipe = RECIPES["fcvid"]
            model = ConMH(ModelConfig.from_preset("small", feature_dim=DIM, frames=FRAMES, nbits=64))
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            gen = epoch_generator(1, 0)
            for i, x in enumerate(stream.epoch(1, 0, batch)):
                if i == steps:
                    break
                out = training_step(model, x, recipe, gen)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                videos += len(x)
        seconds = time.perf_counter() - tic
    print(
        json.dumps(
            {
                "mode": mode,
                "videos": videos,
                "seconds": seconds,
                "videos_per_s": videos / seconds,
                "peak_rss_mb": peak_rss_mb(),
                "n": ff.n,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,8", help="file sizes in GB, comma-separated (default: 1,8)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/conmh-bench"), help="where the files go")
    parser.add_argument("--steps", type=int, default=4, help="training steps to time (default: 4)")
    parser.add_argument("--train-batch", type=int, default=128, help="training batch (default: 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--default-allocator", action="store_true", help="training: keep glibc's malloc defaults")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.train_batch, args.threads, args.default_allocator)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        path = args.workdir / f"feats_{size:g}GB.h5"
        tic = time.perf_counter()
        n = make_file(path, size)
        print(f"{path}: {n} videos ready ({time.perf_counter() - tic:.0f}s)", file=sys.stderr)
        for mode in ("loader", "loader-cold", "train"):
            if mode == "loader-cold" and not drop_page_cache():
                continue
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                str(path),
                "--steps",
                str(args.steps),
                "--train-batch",
                str(args.train_batch),
                "--threads",
                str(args.threads),
            ]
            cmd += ["--default-allocator"] if args.default_allocator else []
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append({"file_gb": size, **result})
            print(rows[-1], file=sys.stderr)
    print("| file | videos | mode | videos/s | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file_gb']:g} GB | {r['n']} | {r['mode']} | {r['videos_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
