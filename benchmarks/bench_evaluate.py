"""Time and memory of ``conmh.metrics.map_at_k`` at FCVID scale (not part of the test suite).

    python benchmarks/bench_evaluate.py [--n 45600] [--bits 64] [--queries 0]
        [--classes 239] [--clustered] [--workers N] [--chunk 256] [--repeat 3]
        [--verify 200] [--out bench.json]

Generates random packed codes and multi-label labels (1 to 3 classes per
video, 1% of videos without a label) for N database videos. With
``--queries 0`` (default) the queries are the database (FCVID protocol:
N x N); otherwise that many separate random queries. ``--clustered`` draws
codes as noisy copies of per-class prototypes, which gives many near
neighbours and ties, as trained codes do.

Reported:

* seconds: wall-clock time of ``map_at_k`` (best of ``--repeat`` runs), and
  the process CPU time of that run (on a busy machine wall time can exceed
  CPU time / cores);
* peak memory: the peak of numpy's allocations during one ``map_at_k`` call
  measured with ``tracemalloc`` (numpy reports its array buffers to it),
  beyond what was allocated before the call; plus the process peak RSS
  (``resource.getrusage`` ru_maxrss) before and after, for reference;
* verify: per-query AP of ``--verify`` queries recomputed by brute force
  (full distance row, stable argsort by (distance, index), loop over ranks)
  must match exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from conmh.codes import pack_bits, unpack_bits
from conmh.metrics import DEFAULT_CHUNK, KS, average_precision_at_k, map_at_k


def make_data(
    n: int, bits: int, classes: int, clustered: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(packed codes (n, ceil(bits/8)), labels uint8 (n, classes))."""
    labels = np.zeros((n, classes), np.uint8)
    first = rng.integers(0, classes, n)
    labels[np.arange(n), first] = 1
    for _ in range(2):  # up to two more labels
        extra = rng.random(n) < 0.2
        labels[np.flatnonzero(extra), rng.integers(0, classes, int(extra.sum()))] = 1
    labels[rng.random(n) < 0.01] = 0
    if clustered:
        prototypes = rng.random((classes, bits)) < 0.5
        flips = rng.random((n, bits)) < 0.15
        bits_ = prototypes[first] ^ flips
    else:
        bits_ = rng.random((n, bits)) < 0.5
    return pack_bits(bits_), labels


def brute_force_ap(
    db: np.ndarray, db_labels: np.ndarray, q: np.ndarray, q_labels: np.ndarray, bits: int, ks: tuple[int, ...]
) -> np.ndarray:
    """AP@K per query, transcribed directly from docs/reference.md §5 (slow)."""
    db_bits, q_bits = unpack_bits(db, bits), unpack_bits(q, bits)
    out = np.zeros((len(q), len(ks)))
    for i in range(len(q)):
        dist = np.count_nonzero(db_bits != q_bits[i], axis=1)
        order = np.argsort(dist, kind="stable")  # ties by ascending index
        rel = np.any(db_labels[order[: max(ks)]] & q_labels[i], axis=1)
        for j, k in enumerate(ks):
            hits, total = 0, 0.0
            for r in range(1, min(k, len(rel)) + 1):
                if rel[r - 1]:
                    hits += 1
                    total += hits / r
            out[i, j] = total / k
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=45_600, help="database size (default: FCVID's 45,600)")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--queries", type=int, default=0, help="separate queries; 0 = the database (FCVID protocol)")
    p.add_argument("--classes", type=int, default=239, help="label classes (FCVID has 239)")
    p.add_argument("--clustered", action="store_true", help="codes clustered by class instead of uniform")
    p.add_argument("--workers", type=int, default=None, help="threads (default: all usable CPUs)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="queries per task")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (best is reported)")
    p.add_argument("--verify", type=int, default=200, help="queries checked against brute force (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    db, db_labels = make_data(args.n, args.bits, args.classes, args.clustered, rng)
    queries = query_labels = None
    if args.queries:
        queries, query_labels = make_data(args.queries, args.bits, args.classes, args.clustered, rng)
    n_queries = args.queries or args.n

    def run() -> dict[int, float]:
        return map_at_k(db, db_labels, queries, query_labels, args.bits, KS, chunk=args.chunk, workers=args.workers)

    times, cpus = [], []
    for _ in range(args.repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        maps = run()
        times.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    best = int(np.argmin(times))

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    verified = None
    if args.verify:
        m = min(args.verify, n_queries)
        pick = np.linspace(0, n_queries - 1, m).astype(np.int64)
        q = db if queries is None else queries
        ql = db_labels if query_labels is None else query_labels
        fast = average_precision_at_k(db, db_labels, q[pick], ql[pick], args.bits, KS)
        slow = brute_force_ap(db, db_labels, q[pick], ql[pick], args.bits, KS)
        verified = bool(np.allclose(fast, slow, rtol=0, atol=1e-12))

    result = {
        "n_database": args.n,
        "n_queries": n_queries,
        "bits": args.bits,
        "classes": args.classes,
        "protocol": "separate_queries" if args.queries else "queries_are_database",
        "codes": "clustered" if args.clustered else "uniform",
        "workers": args.workers or len(os.sched_getaffinity(0)),
        "chunk": args.chunk,
        "seconds": round(times[best], 3),
        "cpu_seconds": round(cpus[best], 3),
        "all_seconds": [round(t, 3) for t in times],
        "peak_numpy_mb_tracemalloc": round((peak - base) / 2**20, 1),
        "maxrss_mb_before": round(rss_before / 2**20, 1),
        "maxrss_mb_after": round(rss_after / 2**20, 1),
        "verified_queries": min(args.verify, n_queries) if args.verify else 0,
        "verified": verified,
        "map": {str(k): round(v, 6) for k, v in maps.items()},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    rows = [
        ("pairs", f"{n_queries:,} x {args.n:,} ({args.bits} bits, {result['codes']}, {result['protocol']})"),
        ("workers / chunk", f"{result['workers']} / {args.chunk}"),
        ("map_at_k wall", f"{result['seconds']:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})"),
        ("map_at_k CPU", f"{result['cpu_seconds']:.2f} s"),
        ("peak numpy memory", f"{result['peak_numpy_mb_tracemalloc']:.1f} MB (tracemalloc, during one call)"),
        ("process peak RSS", f"{result['maxrss_mb_before']:.0f} MB before, {result['maxrss_mb_after']:.0f} MB after"),
        ("load average", ", ".join(map(str, result["load_average"]))),
        (
            "brute-force check",
            "skipped"
            if verified is None
            else f"{'OK' if verified else 'MISMATCH'} on {result['verified_queries']} queries",
        ),
        ("mAP@" + ",".join(map(str, KS)), " ".join(f"{v:.4f}" for v in maps.values())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if verified in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
