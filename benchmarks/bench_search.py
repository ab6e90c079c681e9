"""Top-k Hamming search: ``conmh.search.hamming_search`` against faiss ``IndexBinaryFlat`` (not part of the tests).

    python benchmarks/bench_search.py [--sizes 101256,1000000] [--bits 64] [--queries 1000] [--k 100]
        [--repeat 3] [--verify 20] [--seed 0] [--out bench_search.json]

For each database size (default: YFCC's 101,256 database videos, and
1,000,000) it draws uniformly random packed codes (database and
``--queries`` queries) and times the top ``--k`` search of all queries, with
one thread and with all usable CPUs (ours: ``workers``; faiss:
``omp_set_num_threads``). faiss is skipped (and said so) when not installed.

Reported per row:

* queries/s and seconds: best of ``--repeat`` wall-clock runs. Ours includes
  the conversion of the packed codes to words (done on every call); faiss's
  index is built once beforehand (``add``, a copy of the codes: its time is
  printed below the table) and only ``search`` is timed;
* peak RSS growth: the growth of the process's peak resident memory during
  one call, beyond the memory resident before it (Linux: the peak, VmHWM, is
  reset through /proc/self/clear_refs before the call; elsewhere the
  ``resource.getrusage`` ru_maxrss delta, which shows only growth past the
  earlier peak). It counts faiss's C++ allocations, which tracemalloc does not see;
* tracemalloc: the peak of numpy's allocations during one call (ours only);
* same: faiss's neighbours against ours as docs/search.md compares them
  (faiss may order equal distances otherwise): per query, equal distances at
  every rank, equal neighbour sets strictly below the k-th distance, and each
  returned item truly at the distance reported. Ours (one thread) is also
  checked on ``--verify`` queries against a full sort of the distance row by
  (distance, index), and the all-threads rows against the one-thread row
  (identical).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conmh.hamming import available_cpus
from conmh.machine import cpu_model
from conmh.search import hamming_search

CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_name() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth(call: Callable[[], object]) -> tuple[float, str]:
    """MB by which the peak resident memory rises above the resident memory before ``call``, and how measured."""
    try:
        CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        call()
        return (_status_kb("VmHWM") - before) / 1024, "VmHWM reset"
    except (OSError, KeyError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss delta"


def traced_peak(call: Callable[[], object]) -> float:
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - base) / 2**20


def best_time(call: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        tic = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - tic)
    return min(times), result


def popcount_distances(db: np.ndarray, q: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Hamming distance of each query to each of its listed database items."""
    return np.bitwise_count(db[indices] ^ q[:, None, :]).sum(axis=2, dtype=np.int64)


def same_neighbours(db: np.ndarray, q: np.ndarray, ours: tuple, theirs: tuple) -> bool:
    """Equal distances at every rank, equal sets below the k-th distance, faiss's items at the distances it reports."""
    (oi, od), (ti, td) = ours, theirs
    if oi.shape != ti.shape or not np.array_equal(od, td):
        return False
    if not np.array_equal(popcount_distances(db, q, ti), td):
        return False
    kth = od[:, -1:]
    below_ours, below_theirs = np.where(od < kth, oi, -1), np.where(td < kth, ti, -1)
    return bool(np.array_equal(np.sort(below_ours, axis=1), np.sort(below_theirs, axis=1)))


def brute_force_ok(db: np.ndarray, q: np.ndarray, indices: np.ndarray, distances: np.ndarray, m: int) -> bool:
    """Ours on ``m`` queries against a full stable sort of the whole distance row (ties by ascending index)."""
    k = indices.shape[1]
    for i in np.linspace(0, len(q) - 1, m).astype(np.int64):
        dist = np.bitwise_count(db ^ q[i]).sum(axis=1, dtype=np.int64)
        order = np.argsort(dist, kind="stable")[:k]
        if not (np.array_equal(order, indices[i]) and np.array_equal(dist[order], distances[i])):
            return False
    return True


def make_codes(n: int, queries: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly random packed codes (database, queries), drawn as bytes (no temporary arrays)."""
    rng = np.random.default_rng([seed, n])
    return rng.integers(0, 256, (n, width), dtype=np.uint8), rng.integers(0, 256, (queries, width), dtype=np.uint8)


def searcher(impl: str, db: np.ndarray, q: np.ndarray, bits: int, k: int, threads: int) -> Callable[[], tuple]:
    """A call of one implementation returning (indices, distances); faiss's index is built here, outside it,
    and our compiled kernel loaded (numba's on-disk cache, or compiled on a machine's first run)."""
    if impl == "conmh":
        hamming_search(db[:10], q[:1], bits, 1, workers=threads)
        return lambda: hamming_search(db, q, bits, k, workers=threads)
    import faiss

    index = faiss.IndexBinaryFlat(bits)
    index.add(db)
    faiss.omp_set_num_threads(threads)

    def search() -> tuple:
        distances, indices = index.search(q, k)
        return indices, distances

    return search


def memory_child(args: argparse.Namespace) -> None:
    """Print the peak memory of one call as JSON (run in a fresh process, see ``memory_of``)."""
    impl, n, threads = args.memory_of.split(",")
    db, q = make_codes(int(n), args.queries, args.bits // 8, args.seed)
    call = searcher(impl, db, q, args.bits, args.k, int(threads))
    rss, how = peak_rss_growth(call)
    print(json.dumps({"rss_mb": rss, "rss_how": how, "traced_mb": traced_peak(call) if impl == "conmh" else None}))


def memory_of(args: argparse.Namespace, impl: str, n: int, threads: int) -> dict:
    """Peak memory of one call, measured in a fresh process whose glibc returns every large block to the
    system when freed (MALLOC_MMAP_THRESHOLD_), so that memory freed earlier cannot hide a call's peak."""
    argv = [sys.executable, __file__, "--memory-of", f"{impl},{n},{threads}", "--bits", str(args.bits)]
    argv += ["--queries", str(args.queries), "--k", str(args.k), "--seed", str(args.seed)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="101256,1000000", help="database sizes (default: YFCC's 101,256 and 1,000,000)")
    p.add_argument("--bits", type=int, default=64, help="code length (a multiple of 8; default: 64)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row (best is reported)")
    p.add_argument("--verify", type=int, default=20, help="queries checked against a full sort (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # IMPL,N,THREADS: internal, one memory measurement
    args = p.parse_args(argv)
    if args.bits % 8:
        p.error("--bits must be a multiple of 8 (random bytes are drawn as codes)")
    if args.memory_of:
        memory_child(args)
        return 0
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss not installed (pip install 'conmh[search]'): faiss rows skipped", file=sys.stderr)

    cpus = available_cpus()
    threads = sorted({1, cpus})
    rows, notes = [], []
    load_before = os.getloadavg()
    for n in (int(s) for s in args.sizes.split(",")):
        db, q = make_codes(n, args.queries, args.bits // 8, args.seed)
        reference = None
        for impl in ("conmh", "faiss") if faiss else ("conmh",):
            for t in threads:
                tic = time.perf_counter()
                call = searcher(impl, db, q, args.bits, args.k, t)
                if impl == "faiss" and t == threads[0]:
                    notes.append(f"faiss index of {n:,} codes built (add) in {time.perf_counter() - tic:.3f} s")
                seconds, result = best_time(call, args.repeat)
                if reference is None:
                    reference = result
                    same = brute_force_ok(db, q, *result, args.verify) if args.verify else None
                elif impl == "conmh":
                    same = bool(np.array_equal(result[0], reference[0]) and np.array_equal(result[1], reference[1]))
                else:
                    same = same_neighbours(db, q, reference, result)
                rows.append(dict(n=n, impl=impl, threads=t, seconds=seconds, same=same) | memory_of(args, impl, n, t))
                print(rows[-1], file=sys.stderr)
                del call
        if faiss:
            faiss.omp_set_num_threads(cpus)

    machine = cpu_name()
    print(f"{args.queries:,} queries, top {args.k}, {args.bits}-bit uniformly random codes; {machine}")
    print(
        f"numpy {np.__version__}, faiss {faiss.__version__ if faiss else 'not installed'}, "
        f"Python {platform.python_version()}; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print()
    print(
        "| database | implementation | threads | queries/s | seconds | peak RSS growth (MB) | tracemalloc (MB) | same |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        traced = "" if r["traced_mb"] is None else f"{r['traced_mb']:.1f}"
        same = {None: "", True: "yes", False: "NO"}[r["same"]]
        impl = "conmh hamming_search" if r["impl"] == "conmh" else "faiss IndexBinaryFlat"
        print(
            f"| {r['n']:,} | {impl} | {r['threads']} | {args.queries / r['seconds']:,.0f} | {r['seconds']:.3f} | "
            f"{r['rss_mb']:.1f} | {traced} | {same} |"
        )
    print()
    hows = sorted({r["rss_how"] for r in rows})
    print(f"peak RSS growth: one call in a fresh process ({', '.join(hows)}); tracemalloc: numpy's allocations only")
    if args.verify:
        print(f"same: conmh 1 thread against a full sort on {args.verify} queries; conmh all threads identical to it;")
        print("faiss: equal distances at every rank, equal neighbour sets below the k-th distance (docs/search.md)")
    for note in notes:
        print(note)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine,
            "queries": args.queries,
            "k": args.k,
            "bits": args.bits,
            "rows": rows,
            "notes": notes,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["same"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
