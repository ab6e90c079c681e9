"""GPU benchmark at FCVID's scale: training epochs, streamed data, encoding, the pipeline on CUDA.

Run:  python benchmarks/bench_gpu.py [--out gpu_bench.json] [--device cuda] [--scale 1.0]
                                     [--parts resident,stream,encode,pipeline] [--epochs 2] [--budget-s 450]

Parts (each fails soft: an error is recorded in the JSON and the next part runs):

* ``resident``: FCVID-shaped features (45,585 videos x 25 frames x 4096,
  standard normal through a ReLU like fc7 features, 18.7 GB of float32)
  generated on the device and kept in one host array, trained with
  ``conmh.train.train`` (FCVID recipe, ``small`` preset, 64 bits, batch 512,
  data mode ``memory``) in ``fp32``, then in ``bf16``, ``--epochs`` epochs
  each. The last epoch is the measurement (the first holds the warm-up): its
  seconds and videos/s from ``train_log.jsonl``, the peak GPU memory of the
  run, and achieved TFLOP/s from the FLOPs of one step (forward + backward,
  counted as in ``bench_train.py``) against the device's matrix-multiply peak.
  The goal: an FCVID epoch in at most 2 s in float32, so that the paper's 805
  epochs take under 30 minutes.
* ``stream``: the first ``--stream-videos`` videos written to an HDF5 file in
  the official layout (``fcv_train_feats.h5``, key ``feats``) and trained in
  data mode ``stream`` (fp32): videos/s against the resident run.
* ``encode``: ``conmh.encode.encode_features`` (float32, batch 1024) over the
  host array and over the HDF5 file: videos/s.
* ``pipeline``: the default miniature pipeline with ``device: cuda``, in a
  copy of the repository (``python -m snakemake --cores 4 -p --config
  'miniature={device: cuda}'``): wall time, ``results/table.csv``, the fit and
  encode jobs of every method, and checks that every ConMH training (its fit
  job's ``+ conmh train ...`` line in the job's log) ran with ``--device cuda``
  (such a job, and a ConMH encode job, exits with an error when CUDA is absent)
  and that GPU processes were seen.

The JSON report is rewritten after every part, so a run cut short keeps what
it measured. Parts that would not fit in what is left of ``--budget-s`` are
skipped (recorded as such); the pipeline gets the time that is left as its
timeout. ``--device cpu`` with a tiny ``--scale`` and ``--dim`` runs the same
code on a CPU (``tests/e2e/test_bench_gpu.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import MatmulPeak, Runner, dtype_name, sync  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conmh.atomic import atomic_path, write_text_atomic  # noqa: E402
from conmh.datasets import FEATURE_KEY, LAYOUTS  # noqa: E402
from conmh.device import numerics  # noqa: E402
from conmh.encode import encode_features  # noqa: E402
from conmh.features import ArrayFeatures, FeatureFiles  # noqa: E402
from conmh.model import ConMH, ModelConfig  # noqa: E402
from conmh.recipes import get_recipe  # noqa: E402
from conmh.train import LOG, train, training_step  # noqa: E402
from helpers.repo import copy_repo  # noqa: E402  (the tests' fresh copy of the repository)

ROOT = Path(__file__).resolve().parents[1]
FCVID = LAYOUTS["fcvid"]
FCVID_VIDEOS = FCVID.real_counts["train"]  # 45,585
PAPER_EPOCHS = 805  # the official runs train 805 epochs (the weights of epoch 800 are evaluated)
EPOCH_GOAL_S = 2.0
PARTS = ("resident", "stream", "encode", "pipeline")
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Seconds a part needs at least to be started (the pipeline then gets all that is left).
MIN_SECONDS = {"resident": 0, "stream": 30, "encode": 15, "pipeline": 60}


# --------------------------------------------------------------------------- bookkeeping


class Report:
    """The JSON report, written atomically after every part."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.budget_s = path, budget_s
        self.start = time.perf_counter()
        self.data: dict = {"parts": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.start
        write_text_atomic(self.path, json.dumps(self.data, indent=2, default=str) + "\n")

    def run(self, name: str, fn: Callable[[], dict], min_seconds: float = 0.0) -> dict:
        """Run one part: its dict, or ``status: failed`` with the error, or ``skipped`` when time is short."""
        if self.left() < min_seconds:
            entry = {
                "status": "skipped",
                "reason": f"{self.left():.0f} s of the budget left, the part needs at least {min_seconds:.0f} s",
            }
        else:
            say(f"--- {name} ({self.left():.0f} s of the budget left)")
            tic = time.perf_counter()
            try:
                entry = {"status": "ok", **fn()}
            except Exception as exc:  # noqa: BLE001 - every part fails soft
                entry = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                    **getattr(exc, "details", {}),
                }
            entry["part_wall_s"] = time.perf_counter() - tic
            if entry["status"] == "failed":  # free what the failed part's frames held before the next part
                gc.collect()
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
        self.data["parts"][name] = entry
        say(
            f"{name}: {entry['status']}"
            + (f" ({entry.get('error') or entry.get('reason')})" if entry["status"] != "ok" else "")
        )
        self.save()
        return entry


def say(message: str) -> None:
    print(message, flush=True)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = {
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "host_memory_gb": _host_memory_gb(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type != "cuda":
        env["device_name"] = platform.processor() or "cpu"
        return env
    try:
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_memory_gb=props.total_memory / 1e9,
            cudnn=torch.backends.cudnn.version(),
            tf32=tf32_settings(),
        )
    except Exception as exc:  # noqa: BLE001 - a description, not a measurement
        env["error"] = f"{type(exc).__name__}: {exc}"
    return env


def tf32_settings() -> dict:
    """Whether float32 matrix products may use TF32 (they should not: ``fp32`` means float32)."""
    return {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
        "matmul_fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
    }


def _host_memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return None


# --------------------------------------------------------------------------- data


def make_features(n: int, frames: int, dim: int, device: torch.device, seed: int, chunk: int = 1024) -> np.ndarray:
    """(n, frames, dim) float32 ReLU'd standard normals, drawn on ``device`` in chunks into one host array."""
    host = np.empty((n, frames, dim), dtype=np.float32)
    out = torch.from_numpy(host)
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        out[start : start + rows].copy_(torch.randn((rows, frames, dim), generator=gen, device=device).relu_())
    return host


def write_h5(path: Path, feats: np.ndarray) -> None:
    """``feats`` as an official-layout feature file (float32 under ``feats``)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset(FEATURE_KEY, data=feats, dtype=np.float32)


# --------------------------------------------------------------------------- measurements


def count_flops(cfg: ModelConfig, recipe, batch: torch.Tensor, device: torch.device, seed: int) -> dict:
    """FLOPs of one training step (forward + backward) at ``batch``'s size, as ``bench_train.py`` counts them."""
    runner = Runner(training_step, cfg, recipe, device, "fp32", seed)
    flops = runner.count_flops(batch)
    del runner
    free_device_memory(device)
    return {"flops_per_step": flops, "batch_size": len(batch), "flops_per_video": flops / len(batch)}


def matmul_peaks(device: torch.device) -> dict:
    """Best rate of a square ``torch.mm`` per dtype, float32 without TF32 as training computes it
    (``conmh.device.numerics``, whatever TORCH_ALLOW_TF32_CUBLAS_OVERRIDE makes the default)."""
    n = 8192 if device.type == "cuda" else 512
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with numerics():
            peak = MatmulPeak(device, dtype, n)
            peak.sample(reps=5)
        out[dtype_name(dtype)] = peak.to_dict()
        del peak
    free_device_memory(device)
    return out


def train_run(
    feats,
    cfg: ModelConfig,
    recipe,
    out_dir: Path,
    device: torch.device,
    precision: str,
    data_mode: str,
    flops: dict | None,
    peaks: dict | None,
    deterministic: bool = False,
) -> dict:
    """One ``conmh.train.train`` run; the numbers of its last epoch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    tic = time.perf_counter()
    train(
        feats,
        cfg,
        recipe,
        out_dir,
        device=str(device),
        progress=False,
        data_mode=data_mode,
        precision=precision,
        deterministic=deterministic,
        meta={"benchmark": "bench_gpu"},
    )
    sync(device)
    wall = time.perf_counter() - tic
    log = [json.loads(line) for line in (out_dir / LOG).read_text(encoding="utf-8").splitlines() if line.strip()]
    last = log[-1]
    entry = {
        "precision": last.get("precision", precision),
        "deterministic": deterministic,
        "data_mode": data_mode,
        "epochs": len(log),
        "epoch_log": [{k: e.get(k) for k in ("epoch", "seconds", "videos_per_s", "loss")} for e in log],
        "epoch_seconds": last["seconds"],
        "videos_per_s": last["videos_per_s"],
        "final_loss": last["loss"],
        "train_call_s": wall,
        "setup_and_checkpoints_s": wall - sum(e["seconds"] for e in log),
        "fcvid_epoch_s": FCVID_VIDEOS / last["videos_per_s"],
    }
    entry["projected_805_epochs_min"] = PAPER_EPOCHS * entry["fcvid_epoch_s"] / 60
    if flops:
        entry["tflops_per_s"] = flops["flops_per_video"] * last["videos_per_s"] / 1e12
        peak = (peaks or {}).get(dtype_name(PRECISION_DTYPE[precision]))
        if peak:
            entry["fraction_of_matmul_peak"] = entry["tflops_per_s"] * 1e12 / peak["best"]
    if device.type == "cuda":
        entry["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        entry["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        entry["tf32_after"] = tf32_settings()
    free_device_memory(device)
    say(
        f"  {precision} {data_mode}: epoch {len(log)} {entry['epoch_seconds']:.3f} s, "
        f"{entry['videos_per_s']:,.0f} videos/s, FCVID epoch {entry['fcvid_epoch_s']:.2f} s"
        + (f", {entry['tflops_per_s']:.1f} TFLOP/s" if "tflops_per_s" in entry else "")
        + (f", peak {entry['peak_gpu_memory_gb']:.1f} GB" if "peak_gpu_memory_gb" in entry else "")
    )
    return entry


def encode_rate(feats, cfg: ModelConfig, device: torch.device, batch_size: int, seed: int) -> dict:
    """Videos/s of ``encode_features`` over all of ``feats`` (a warm-up pass over two batches first)."""
    torch.manual_seed(seed)
    model = ConMH(cfg)
    warm = min(feats.n, 2 * batch_size)
    encode_features(model, ArrayFeatures(np.ascontiguousarray(feats.read(0, warm))), device, batch_size)
    sync(device)
    tic = time.perf_counter()
    bits = encode_features(model, feats, device, batch_size)
    sync(device)
    seconds = time.perf_counter() - tic
    del model
    free_device_memory(device)
    say(f"  {feats.n:,} videos in {seconds:.2f} s: {feats.n / seconds:,.0f} videos/s")
    return {
        "videos": feats.n,
        "batch_size": batch_size,
        "seconds": seconds,
        "videos_per_s": feats.n / seconds,
        "bit_balance": float(bits.mean()),
    }


# --------------------------------------------------------------------------- pipeline


class GpuProcesses:
    """Polls ``nvidia-smi`` in the background: the processes that used the GPU, those present at the start
    (this one among them) left out."""

    QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.pids, self.max_mib = every_s, set(), 0
        self.before = set(self._snapshot())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _snapshot(self) -> dict[int, int]:
        """pid -> MiB used, of the processes on the GPU now ({} when nvidia-smi fails)."""
        try:
            out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        found = {}
        for line in out.splitlines():
            pid, _, mib = (part.strip() for part in line.partition(","))
            if pid.isdigit():
                found[int(pid)] = int(mib) if mib.isdigit() else 0
        return found

    def _poll(self) -> None:
        while not self.stop.is_set():
            for pid, mib in self._snapshot().items():
                if pid not in self.before and pid != os.getpid():
                    self.pids.add(pid)
                    self.max_mib = max(self.max_mib, mib)
            self.stop.wait(self.every_s)

    def __enter__(self) -> GpuProcesses:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def run_pipeline(device: str, cores: int, timeout_s: float, workdir: Path, extra_config: list[str] = ()) -> dict:
    """The miniature pipeline with ``miniature.device`` set to ``device``, in a fresh copy of the repository.

    ``extra_config``: more ``--config`` items (e.g. ``datasets=[fcvid-mini]``), for quick checks.
    """
    missing = [tool for tool in ("conmh", "python") if shutil.which(tool) is None]
    if importlib.util.find_spec("snakemake") is None:
        missing.append("the snakemake package")
    if missing:
        raise RuntimeError(f"the pipeline needs {', '.join(missing)} (on PATH / importable); not found")
    repo = copy_repo(workdir / "repo")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        "-p",
        "--config",
        f"miniature={{device: {device}}}",
        *extra_config,
    ]
    say(f"  {' '.join(cmd)}  (in {repo}, timeout {timeout_s:.0f} s)")
    monitor = GpuProcesses() if device.startswith("cuda") and shutil.which("nvidia-smi") else None
    tic, timed_out = time.perf_counter(), False
    with monitor or contextlib.nullcontext():
        proc = subprocess.Popen(
            cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the jobs it started
            output, _ = proc.communicate()
    wall = time.perf_counter() - tic
    # The fit and encode jobs of every method, from the commands Snakemake printed (-p); the device of each
    # ConMH training, from the `+ conmh train ... --device D` line its fit job printed into its log.
    jobs = re.findall(r"conmh pipeline (fit|encode) --method (\S+) .*?--log (\S+)", output)
    trainings = [_training_device(repo / log) for kind, method, log in jobs if (kind, method) == ("fit", "conmh")]
    result = {
        "command": cmd,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "fit_jobs": _by_method(method for kind, method, _ in jobs if kind == "fit"),
        "encode_jobs": _by_method(method for kind, method, _ in jobs if kind == "encode"),
        "job_devices": sorted({str(dev) for dev in trainings}),
        "train_log_precisions": _train_log_precisions(repo / "results" / "fit"),
        "models": len(list((repo / "work" / "fit").glob("*/conmh-*/model.pt"))),
    }
    if monitor is not None:
        result.update(gpu_processes_seen=len(monitor.pids), gpu_process_max_mib=monitor.max_mib)
    table = repo / "results" / "table.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as fh:
            result["table"] = list(csv.DictReader(fh))
        md = repo / "results" / "table.md"
        result["table_md"] = md.read_text(encoding="utf-8") if md.is_file() else None
    result["all_jobs_on_device"] = (
        proc.returncode == 0
        and result["job_devices"] == [device]
        and result["fit_jobs"].get("conmh", 0) > 0
        and result["encode_jobs"].get("conmh", 0) > 0
    )
    if proc.returncode != 0:
        result["output_tail"] = output[-6000:]
        raise PipelineFailed(result)
    say(
        f"  ok in {wall:.0f} s: fit jobs {result['fit_jobs']}, encode jobs {result['encode_jobs']}, ConMH trainings "
        f"on {result['job_devices']}" + (f", {result['gpu_processes_seen']} GPU processes seen" if monitor else "")
    )
    return result


class PipelineFailed(Exception):
    """The pipeline exited non-zero; ``details`` holds what was measured and the output's tail."""

    def __init__(self, details: dict) -> None:
        super().__init__(
            f"snakemake exited with {details['returncode']} after {details['wall_s']:.0f} s"
            + (" (timed out)" if details["timed_out"] else "")
            + "; its output_tail is in the report"
        )
        self.details = details


def _by_method(methods) -> dict[str, int]:
    counts: dict[str, int] = {}
    for method in methods:
        counts[method] = counts.get(method, 0) + 1
    return counts


def _training_device(job_log: Path) -> str | None:
    """The ``--device`` of the ``conmh train`` a ConMH fit job launched (the ``+`` line of its log)."""
    text = job_log.read_text(encoding="utf-8", errors="replace") if job_log.is_file() else ""
    found = re.search(r"^\+ .*\bconmh train .*?--device (\S+)", text, re.M)
    return found.group(1) if found else None


def _train_log_precisions(folder: Path) -> dict[str, int]:
    """The precisions of the epochs of ConMH's training logs (results/fit/<dataset>/conmh-<bits>bits.jsonl)."""
    counts: dict[str, int] = {}
    for path in folder.glob("*/conmh-*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                key = str(json.loads(line).get("precision"))
                counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------- report


def markdown(data: dict) -> str:
    env, parts, s = data["environment"], data["parts"], data["setting"]
    lines = [
        f"Device: {env.get('device_name')} ({env['device']}), torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + f"; float32 matmul precision "
        f"{env['float32_matmul_precision']}.",
        f"Data: {s['videos']:,} videos x {s['frames']} x {s['dim']} float32 ({s['gb']:.1f} GB), "
        f"preset {s['preset']}, {s['bits']} bits, batch {s['batch_size']}, epoch {s['epochs']} of {s['epochs']} "
        "timed (the first holds the warm-up).",
    ]
    if parts.get("data", {}).get("status") == "ok":
        lines.append(f"Features generated on {env['device']} into host memory in {parts['data']['generate_s']:.1f} s.")
    flops, peaks = parts.get("flops", {}), parts.get("matmul_peak", {})
    if flops.get("status") == "ok":
        lines.append(
            f"FLOPs of one step (forward + backward, batch {flops['batch_size']}): "
            f"{flops['flops_per_step'] / 1e9:,.1f} GFLOP."
        )
    if peaks.get("status") == "ok":
        lines.append(
            "Matrix-multiply peak (best torch.mm): "
            + ", ".join(f"{k} {v['best'] / 1e12:.1f} TFLOP/s" for k, v in peaks["peaks"].items() if isinstance(v, dict))
            + "."
        )
    runs = [
        name
        for name in ("resident_fp32", "resident_bf16", "resident_fp32_deterministic", "stream_fp32")
        if name in parts
    ]
    if runs:
        lines += [
            "",
            "| run | data | epoch s | videos/s | FCVID epoch s | 805 epochs (min) | TFLOP/s | of peak "
            "| peak GPU memory GB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for name in runs:
        p = parts[name]
        if p["status"] != "ok":
            lines.append(f"| {name} | {p['status']}: {p.get('error') or p.get('reason')} | | | | | | | |")
            continue
        data_kind = (
            f"resident ({s['videos']:,} videos)"
            if p["data_mode"] == "memory"
            else f"HDF5 stream ({p.get('videos', 0):,} videos)"
        )
        lines.append(
            f"| {name} | {data_kind} | {p['epoch_seconds']:.3f} | {p['videos_per_s']:,.0f} | {p['fcvid_epoch_s']:.2f} "
            f"| {p['projected_805_epochs_min']:.1f} | {_fmt(p.get('tflops_per_s'), '.3g')} "
            f"| {_fmt(p.get('fraction_of_matmul_peak'), '.2f')} | {_fmt(p.get('peak_gpu_memory_gb'), '.1f')} |"
        )
    for name in ("encode_memory", "encode_hdf5"):
        p = parts.get(name)
        if p:
            lines.append(
                f"\nEncoding {name.split('_')[1]} (float32, batch {p.get('batch_size', '?')}): "
                + (
                    f"{p['videos']:,} videos in {p['seconds']:.2f} s, {p['videos_per_s']:,.0f} videos/s"
                    if p["status"] == "ok"
                    else f"{p['status']}: {p.get('error') or p.get('reason')}"
                )
            )
    if "goal" in data:
        g = data["goal"]
        lines.append(
            f"\nGoal (FCVID epoch <= {EPOCH_GOAL_S:g} s in float32): "
            f"{'met' if g['epoch_goal_met'] else 'NOT met'}: {g['fcvid_epoch_s']:.2f} s per epoch, "
            f"{g['projected_805_epochs_min']:.1f} min for {PAPER_EPOCHS} epochs."
        )
    p = parts.get("pipeline")
    if p:
        if p["status"] == "ok":
            lines.append(
                f"\nPipeline (miniature, device {p['job_devices']}): ok in {p['wall_s']:.0f} s, "
                f"fit jobs {p['fit_jobs']}, encode jobs {p['encode_jobs']}, {p['models']} ConMH models, "
                f"train-log precisions {p['train_log_precisions']}"
                + (f", {p['gpu_processes_seen']} GPU processes seen" if "gpu_processes_seen" in p else "")
            )
            if p.get("table_md"):
                lines += ["", p["table_md"].strip()]
    bad = [
        f"{name} ({p['status']}: {p.get('error') or p.get('reason')})"
        for name, p in parts.items()
        if p["status"] != "ok"
    ]
    if bad:
        lines.append("\nParts not done: " + "; ".join(bad))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"), help="JSON report")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of FCVID's 45,585 training videos")
    parser.add_argument("--dim", type=int, default=FCVID.feature_dim, help="feature dim (FCVID: 4096)")
    parser.add_argument("--preset", default="small", help="model preset (the paper: small)")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=get_recipe("fcvid").batch_size)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training run; the last is timed")
    parser.add_argument("--stream-videos", type=int, default=8192, help="videos in the streamed HDF5 file")
    parser.add_argument("--encode-batch", type=int, default=1024)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--pipeline-cores", type=int, default=4)
    parser.add_argument(
        "--pipeline-config",
        default="",
        help="more snakemake --config items, space-separated (default: none, the whole miniature run)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="time budget: later parts are skipped when it runs short"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or not args.parts:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.scale <= 0 or args.epochs < 1 or args.stream_videos < 2 or args.batch_size < 2 or args.dim < 1:
        parser.error("--scale must be > 0, --epochs >= 1, --stream-videos and --batch-size >= 2, --dim >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}, but CUDA is not available here", file=sys.stderr)
        return 2
    report = Report(args.out, args.budget_s)
    n = max(2, round(FCVID_VIDEOS * args.scale))
    frames = FCVID.frames
    cfg = ModelConfig.from_preset(args.preset, feature_dim=args.dim, frames=frames, nbits=args.bits)
    recipe = get_recipe("fcvid").replace(epochs=args.epochs, batch_size=args.batch_size)
    report.data.update(
        environment=environment(device),
        setting={
            "videos": n,
            "frames": frames,
            "dim": args.dim,
            "gb": n * frames * args.dim * 4 / 1e9,
            "preset": args.preset,
            "bits": args.bits,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "recipe": recipe.to_dict(),
            "parts": args.parts,
            "budget_s": args.budget_s,
        },
    )
    report.save()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="conmh-bench-gpu-", dir=args.workdir))
    state: dict = {}

    def features() -> np.ndarray:
        if "feats" not in state:
            state["feats"] = make_features(n, frames, args.dim, device, args.seed)
            sync(device)
        return state["feats"]

    def h5_file() -> FeatureFiles:
        if "h5" not in state:
            path = scratch / "stream" / FCVID.train[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            tic = time.perf_counter()
            write_h5(path, features()[: min(args.stream_videos, n)])
            state["h5_write_s"] = time.perf_counter() - tic
            state["h5"] = FeatureFiles([path])
        return state["h5"]

    def generate() -> dict:
        tic = time.perf_counter()
        features()
        return {"videos": n, "gb": n * frames * args.dim * 4 / 1e9, "generate_s": time.perf_counter() - tic}

    def stream() -> dict:
        ff = h5_file()
        return {
            "videos": ff.n,
            "h5_write_s": state["h5_write_s"],
            **train_run(ff, cfg, recipe, scratch / "stream-fp32", device, "fp32", "stream", flops, peaks),
        }

    try:
        if any(p in args.parts for p in ("resident", "stream", "encode")):
            report.run("data", generate)
        if any(p in args.parts for p in ("resident", "stream")):
            report.run("matmul_peak", lambda: {"peaks": matmul_peaks(device)})
            report.run(
                "flops",
                lambda: count_flops(
                    cfg, recipe, torch.from_numpy(features()[: args.batch_size]).to(device), device, args.seed
                ),
            )
        flops = (
            report.data["parts"].get("flops") if report.data["parts"].get("flops", {}).get("status") == "ok" else None
        )
        peaks = report.data["parts"].get("matmul_peak", {}).get("peaks")
        if "resident" in args.parts:
            # fp32 and bf16, and fp32 in deterministic mode (what --deterministic costs)
            for precision, deterministic in (("fp32", False), ("bf16", False), ("fp32", True)):
                name = f"resident_{precision}" + ("_deterministic" if deterministic else "")
                report.run(
                    name,
                    lambda p=precision, d=deterministic, name=name: train_run(
                        features(), cfg, recipe, scratch / name, device, p, "memory", flops, peaks, d
                    ),
                )
            fp32 = report.data["parts"]["resident_fp32"]
            if fp32["status"] == "ok":
                report.data["goal"] = {
                    "fcvid_epoch_s": fp32["fcvid_epoch_s"],
                    "epoch_goal_met": fp32["fcvid_epoch_s"] <= EPOCH_GOAL_S,
                    "projected_805_epochs_min": fp32["projected_805_epochs_min"],
                }
        if "stream" in args.parts:
            report.run("stream_fp32", stream, MIN_SECONDS["stream"])
        if "encode" in args.parts:
            report.run(
                "encode_memory",
                lambda: encode_rate(ArrayFeatures(features()), cfg, device, args.encode_batch, args.seed),
                MIN_SECONDS["encode"],
            )
            report.run(
                "encode_hdf5",
                lambda: encode_rate(h5_file(), cfg, device, args.encode_batch, args.seed),
                MIN_SECONDS["encode"],
            )
        if "h5" in state:
            state.pop("h5").close()
        state.pop("feats", None)
        free_device_memory(device)
        if "pipeline" in args.parts:
            report.run(
                "pipeline",
                lambda: run_pipeline(
                    str(device),
                    args.pipeline_cores,
                    max(30.0, report.left() - 10),
                    scratch / "pipeline",
                    args.pipeline_config.split(),
                ),
                MIN_SECONDS["pipeline"],
            )
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report.data["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    try:
        report.data["markdown"] = markdown(report.data)
    except Exception as exc:  # noqa: BLE001 - the JSON holds every number anyway
        report.data["markdown"] = f"(no table: {type(exc).__name__}: {exc})"
    report.save()
    say("\n" + report.data["markdown"])
    say(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
