"""`conmh evaluate` and `conmh search` near the hardware's limit (issue 19; not part of the tests).

    python benchmarks/bench_evaluate.py [--bits 16,32,64] [--repeat 3] [--search-sizes 101256,1000000]
        [--queries 1000] [--k 100] [--skip-search] [--skip-first-run] [--baseline CHECKOUT]
        [--out bench_evaluate.json]

Prints the CPU model and two Markdown tables:

* `conmh evaluate` as a process (every default measure: mAP@K, precision
  and recall at every radius, precision within radius 2, per-class mAP, and
  the per-query CSV), at FCVID's protocol (45,600 queries = the database,
  239 classes) and YFCC's shape (1,000 queries against 101,256, 80
  classes), 16/32/64 bits: process wall time (best and median of
  ``--repeat``, the numba kernels loaded from their on-disk cache) and peak
  RSS (``ru_maxrss`` of the child from ``os.wait4``). Once more with an empty
  numba cache (``NUMBA_CACHE_DIR`` a fresh folder): the first run on a
  machine, which compiles the kernels. Codes are class-clustered (noisy
  copies of per-class prototypes: many near neighbours and ties).
  ``--baseline CHECKOUT`` adds the same runs of another checkout's package
  (e.g. ``git worktree add /tmp/main main``), in the same process order,
  for a before/after ratio under the same conditions.
* `conmh.hamming.hamming_search` (what `conmh search` runs) against faiss
  ``IndexBinaryFlat`` over uniformly random 64-bit codes, top ``--k`` of
  ``--queries`` queries, 1 thread and 2 (ours: ``workers``; faiss:
  ``omp_set_num_threads``), in one process, best of ``--repeat``; the ratio
  of queries/s, and whether both return the same neighbours (as
  ``bench_search.py`` checks them: faiss may order equal distances otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import best_time, brute_force_ok, cpu_name, make_codes, same_neighbours, searcher  # noqa: E402

from conmh.codes import Codes, pack_bits, write_codes  # noqa: E402
from conmh.machine import cpu_info  # noqa: E402

SHAPES = {  # name: (database, queries (0: the database), classes)
    "FCVID": (45_600, 0, 239),
    "YFCC": (101_256, 1_000, 80),
}


def cpu_features() -> str:
    """CPU family/model and the widest SIMD the kernels can use, from /proc/cpuinfo."""
    fields = cpu_info()
    if not fields:
        return ""
    flags = set(fields.get("flags", "").split())
    simd = "AVX-512" + (" with VPOPCNTDQ" if "avx512_vpopcntdq" in flags else "") if "avx512f" in flags else ""
    simd = simd or ("AVX2" if "avx2" in flags else "no AVX2")
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {simd}"


def instruction_sets(faiss_ran: bool) -> str:
    """numba's compile target (NUMBA_CPU_NAME, e.g. haswell for AVX2 code on an AVX-512 machine) and, when
    faiss ran, the SIMD level its dynamic dispatch chose (FAISS_SIMD_LEVEL, e.g. AVX2)."""
    import numba

    used = f"numba target {numba.config.CPU_NAME or 'host'}"
    if faiss_ran:
        import faiss

        config = getattr(faiss, "SIMDConfig", None)  # faiss >= 1.13 (dynamic dispatch)
        used += f", faiss {config.get_level_name() if config else 'as built'}"
    return used


def make_labelled(n: int, bits: int, classes: int, rng: np.random.Generator, prototypes: np.ndarray):
    """Class-clustered packed codes and multi-label labels (1-3 classes per video, 1% without a label)."""
    labels = np.zeros((n, classes), np.uint8)
    first = rng.integers(0, classes, n)
    labels[np.arange(n), first] = 1
    for _ in range(2):
        extra = rng.random(n) < 0.2
        labels[np.flatnonzero(extra), rng.integers(0, classes, int(extra.sum()))] = 1
    labels[rng.random(n) < 0.01] = 0
    return pack_bits(prototypes[first] ^ (rng.random((n, bits)) < 0.15)), labels


def write_shape(folder: Path, name: str, bits: int, seed: int) -> Path:
    n_db, n_q, classes = SHAPES[name]
    rng = np.random.default_rng([seed, bits, n_db])
    prototypes = rng.random((classes, bits)) < 0.5
    db, db_labels = make_labelled(n_db, bits, classes, rng, prototypes)
    queries = query_labels = None
    if n_q:
        queries, query_labels = make_labelled(n_q, bits, classes, rng, prototypes)
    path = folder / f"{name.lower()}-{bits}.h5"
    write_codes(path, Codes(bits, name.lower(), "bench", db, db_labels, queries, query_labels))
    return path


REPO = Path(__file__).resolve().parent.parent


def run_evaluate(codes: Path, env: dict, checkout: Path = REPO) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `conmh evaluate` process running the package of ``checkout``."""
    argv = [sys.executable, "-m", "conmh.cli", "evaluate", str(codes), "--out", str(codes.with_suffix(".json"))]
    argv += ["--per-query", str(codes.with_suffix(".csv"))]
    env = {**env, "PYTHONPATH": str(checkout)}
    tic = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=codes.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
    if status != 0:
        raise RuntimeError(f"conmh evaluate {codes} failed: {proc.stderr.read().decode()}")
    proc.stderr.close()
    return wall, usage.ru_maxrss / 1024


def bench_evaluate(args: argparse.Namespace, folder: Path) -> list[dict]:
    rows = []
    for name in SHAPES:
        for bits in args.bits:
            codes = write_shape(folder, name, bits, args.seed)
            if not args.skip_first_run and name == "FCVID" and bits == max(args.bits):
                env = {**os.environ, "NUMBA_CACHE_DIR": str(folder / "empty-numba-cache")}
                wall, rss = run_evaluate(codes, env)
                rows.append(dict(shape=name, bits=bits, cache="empty (compiles)", best=wall, median=wall, rss=rss))
                print(rows[-1], file=sys.stderr)
            run_evaluate(codes, dict(os.environ))  # fills the cache, if this is its first use
            for checkout in [REPO] + ([args.baseline] if args.baseline else []):
                runs = [run_evaluate(codes, dict(os.environ), checkout) for _ in range(args.repeat)]
                walls = [w for w, _ in runs]
                cache = "warm" if checkout == REPO else f"baseline {checkout}"
                row = dict(shape=name, bits=bits, cache=cache, best=min(walls), median=float(np.median(walls)))
                rows.append(row | dict(rss=max(r for _, r in runs)))
                print(rows[-1], file=sys.stderr)
    return rows


def bench_search(args: argparse.Namespace) -> list[dict]:
    import faiss

    rows = []
    for n in args.search_sizes:
        db, q = make_codes(n, args.queries, 8, args.seed)
        for threads in (1, 2):
            ours_s, ours = best_time(searcher("conmh", db, q, 64, args.k, threads), args.repeat)
            faiss_s, theirs = best_time(searcher("faiss", db, q, 64, args.k, threads), args.repeat)
            same = same_neighbours(db, q, ours, theirs) and brute_force_ok(db, q, *ours, 10)
            rows.append(dict(n=n, threads=threads, ours_s=ours_s, faiss_s=faiss_s, same=bool(same)))
            print(rows[-1], file=sys.stderr)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[16, 32, 64])
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row (best and median reported)")
    p.add_argument("--search-sizes", type=lambda s: [int(n) for n in s.split(",")], default=[101_256, 1_000_000])
    p.add_argument("--queries", type=int, default=1000, help="search queries")
    p.add_argument("--k", type=int, default=100, help="search neighbours per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-search", action="store_true", help="only the evaluate table")
    p.add_argument("--skip-first-run", action="store_true", help="no run with an empty numba cache")
    p.add_argument(
        "--baseline", type=Path, help="also time `conmh evaluate` of this checkout (e.g. a worktree of main)"
    )
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="conmh-bench-evaluate-") as tmp:
        evaluate_rows = bench_evaluate(args, Path(tmp))
    search_rows = [] if args.skip_search else bench_search(args)
    load_after = os.getloadavg()

    import numba

    machine = f"{cpu_name()} ({cpu_features()})"
    print(f"{machine}; numba {numba.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"instruction sets used: {instruction_sets(search_rows != [])}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)")
    print()
    print("`conmh evaluate CODES --out M.json --per-query Q.csv` (every default measure), one process per run:")
    print()
    base = {(r["shape"], r["bits"]): r["best"] for r in evaluate_rows if r["cache"].startswith("baseline")}
    print(
        "| shape | queries x database | bits | package, numba cache | wall s (best) | wall s (median) | peak RSS MiB |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    for r in evaluate_rows:
        n_db, n_q, classes = SHAPES[r["shape"]]
        pairs = f"{n_q or n_db:,} x {n_db:,}, {classes} classes"
        what = r["cache"] if r["cache"].startswith("baseline") else f"this checkout, {r['cache']}"
        ratio = base.get((r["shape"], r["bits"])) if r["cache"] == "warm" else None
        if ratio:
            speed = ratio / r["best"]
            faster = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
            what += f" ({faster} than the baseline)"
        print(
            f"| {r['shape']} | {pairs} | {r['bits']} | {what} | {r['best']:.2f} | {r['median']:.2f} | {r['rss']:.0f} |"
        )
    if search_rows:
        print()
        print(f"Top {args.k} of {args.queries:,} queries, uniformly random 64-bit codes, one process:")
        print()
        print("| database | threads | conmh q/s | faiss IndexBinaryFlat q/s | conmh / faiss | same neighbours |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in search_rows:
            ours, theirs = args.queries / r["ours_s"], args.queries / r["faiss_s"]
            same = "yes" if r["same"] else "NO"
            print(f"| {r['n']:,} | {r['threads']} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x | {same} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = dict(
            machine=machine,
            load_average_before=load_before,
            load_average_after=load_after,
            evaluate=evaluate_rows,
            search=search_rows,
        )
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["same"] for r in search_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
