"""Training throughput of ConMH: our step against a naive step shaped like the official code.

Run:  python benchmarks/bench_train.py [--quick] [--out bench_train.json] [--threads N]

For the ``small`` preset at the FCVID setting (4096-dim features, 25 frames,
batch 512, mask 0.75, 64 bits) and the ActivityNet setting (2048, 30 frames,
batch 128, mask 0.5, 64 bits) it times warm training steps (forward, backward
and the Adam update) of ``conmh.train.training_step`` and of
``benchmarks/naive_reference.naive_training_step`` (the same maths, checked by
``tests/test_naive_reference.py``), alternating the two so that a change of
load on the machine hits both alike. It reports videos/s, the FLOPs of one
step (forward + backward, counted by ``torch.utils.flop_counter``), achieved
FLOP/s, that as a fraction of the machine's matrix-multiply peak measured in
the same run (a large ``torch.mm`` with the same thread count), and the ratio
ours / naive. It prints a Markdown table and writes the numbers as JSON.

On CUDA our step runs under bf16 autocast as ``conmh train`` does, and the
naive step in float32 as the official code does; each is compared with the
peak of its own dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_reference import naive_training_step  # noqa: E402

from conmh.atomic import write_text_atomic  # noqa: E402
from conmh.model import ConMH, ModelConfig  # noqa: E402
from conmh.recipes import Recipe, get_recipe  # noqa: E402
from conmh.train import StepOutput, training_step  # noqa: E402

StepFn = Callable[[ConMH, torch.Tensor, Recipe, torch.Generator], StepOutput]


@dataclass(frozen=True)
class Setting:
    dataset: str
    feature_dim: int
    frames: int
    nbits: int = 64


SETTINGS = {
    "fcvid": Setting("fcvid", feature_dim=4096, frames=25),
    "activitynet": Setting("activitynet", feature_dim=2048, frames=30),
}

# The CPU flash-attention kernels behind scaled_dot_product_attention have no
# FLOP formula in torch.utils.flop_counter; without these, our attention would
# count as free while the naive step's bmm are counted.
_aten = torch.ops.aten
_SDPA_CPU_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of returning it to the OS.

    By default every tensor above 32 MiB is a fresh mmap, so each step page-faults
    its large activations in again (about 1 s of system time per FCVID step on
    one core). Applies to the whole process, so to both steps alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulPeak:
    """The machine's matrix-multiply rate: (n x n) @ (n x n) products timed now and then.

    The peak is the best rate seen over the whole run: on a shared machine a
    single measurement can land in a busy moment, so it is sampled before, during
    (once per round of steps) and after the training steps.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int) -> None:
        self.device, self.dtype, self.n = device, dtype, n
        self.a = torch.randn(n, n, device=device).to(dtype)
        self.b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(self.a, self.b)
        self.rates: list[float] = []

    def sample(self, reps: int = 1) -> None:
        for _ in range(reps):
            sync(self.device)
            tic = time.perf_counter()
            torch.mm(self.a, self.b)
            sync(self.device)
            self.rates.append(2 * self.n**3 / (time.perf_counter() - tic))

    @property
    def best(self) -> float:
        return max(self.rates)

    def to_dict(self) -> dict:
        return {"n": self.n, "dtype": dtype_name(self.dtype), "best": self.best,
                "median": statistics.median(self.rates), "samples": len(self.rates)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Runner:
    """One implementation's model, optimiser and step, as ``conmh.train.train`` runs them."""

    def __init__(self, name: str, step: StepFn, cfg: ModelConfig, recipe: Recipe, device: torch.device,
                 autocast_bf16: bool, seed: int) -> None:
        torch.manual_seed(seed)
        self.name, self.step, self.recipe, self.device = name, step, recipe, device
        self.model = ConMH(cfg).to(device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.lr, weight_decay=0.0)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16
                         else contextlib.nullcontext())
        self.dtype = torch.bfloat16 if autocast_bf16 else torch.float32
        self.generator = torch.Generator().manual_seed(seed)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def loss_and_backward(self, feats: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            out = self.step(self.model, feats, self.recipe, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        return out.loss.detach()

    def train_step(self, feats: torch.Tensor) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one full training step."""
        sync(self.device)
        tic, cpu = time.perf_counter(), time.process_time()
        self.loss_and_backward(feats)
        self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - tic, time.process_time() - cpu

    def count_flops(self, feats: torch.Tensor) -> int:
        """FLOPs of forward + backward; the step is completed, so it also serves as the first warm-up."""
        with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU_FLOPS) as counter:
            self.loss_and_backward(feats)
        self.optimizer.step()
        return counter.get_total_flops()


def bench_setting(setting: Setting, device: torch.device, warmup: int, steps: int, seed: int,
                  peaks: list[MatmulPeak]) -> dict:
    recipe = get_recipe(setting.dataset)
    cfg = ModelConfig.from_preset("small", feature_dim=setting.feature_dim, frames=setting.frames,
                                  nbits=setting.nbits)
    feats = torch.randn(recipe.batch_size, setting.frames, setting.feature_dim,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    cuda = device.type == "cuda"
    runners = [
        Runner("ours", training_step, cfg, recipe, device, autocast_bf16=cuda, seed=seed),
        Runner("naive", naive_training_step, cfg, recipe, device, autocast_bf16=False, seed=seed),
    ]
    flops = {r.name: r.count_flops(feats) for r in runners}
    for _ in range(warmup):
        for r in runners:
            r.train_step(feats)
    for i in range(steps):  # alternate, starting with each in turn, so that load drift hits both alike
        for r in (runners if i % 2 == 0 else runners[::-1]):
            wall, cpu = r.train_step(feats)
            r.times.append(wall)
            r.cpu_times.append(cpu)
        for peak in peaks:
            peak.sample()
    result = {"dataset": setting.dataset, "feature_dim": setting.feature_dim, "frames": setting.frames,
              "batch_size": recipe.batch_size, "mask_ratio": recipe.mask_ratio, "nbits": setting.nbits,
              "preset": "small", "impls": {}}
    for r in runners:
        sec = statistics.median(r.times)
        result["impls"][r.name] = {
            "compute_dtype": dtype_name(r.dtype),
            "step_seconds_median": sec, "step_seconds_min": min(r.times), "step_seconds": r.times,
            # CPU time is less sensitive than wall time to other processes on a shared machine.
            "step_cpu_seconds_median": statistics.median(r.cpu_times), "step_cpu_seconds": r.cpu_times,
            "videos_per_s": recipe.batch_size / sec,
            "flops_per_step": flops[r.name], "flops_per_s": flops[r.name] / sec,
        }
    ours, naive = result["impls"]["ours"], result["impls"]["naive"]
    result["speedup_ours_over_naive"] = ours["videos_per_s"] / naive["videos_per_s"]
    # Companions of the ratio on a shared machine: the median of the per-round
    # ratios (the two steps of a round run back to back), the CPU-time ratio ...
    result["speedup_paired_median"] = statistics.median(n / o for n, o in zip(runners[1].times, runners[0].times))
    result["speedup_cpu_time"] = naive["step_cpu_seconds_median"] / ours["step_cpu_seconds_median"]
    # and of the fastest steps, those least disturbed by intermittent load
    result["speedup_fastest_steps"] = naive["step_seconds_min"] / ours["step_seconds_min"]
    return result


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}, {report['threads']} threads; load average "
        f"{report['loadavg_start'][0]:.2f} at start, {report['loadavg_end'][0]:.2f} at end; "
        f"{report['steps']} timed steps each (medians); glibc keep-freed-memory {report['keep_freed_memory']}.",
        "Matrix-multiply peak: " + ", ".join(
            f"{p['dtype']} {p['best'] / 1e9:.1f} GFLOP/s (best of {p['samples']}, n={p['n']}, "
            f"median {p['median'] / 1e9:.1f})"
            for p in report["matmul_peak"].values()),
        "",
        "| setting | step | s/step (median) | videos/s | GFLOP/step (fwd+bwd) | GFLOP/s | fraction of peak "
        "| ours / naive | CPU s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        label = f"{res['dataset']} (D={res['feature_dim']}, T={res['frames']}, B={res['batch_size']}, " \
                f"mask {res['mask_ratio']})"
        for name, imp in res["impls"].items():
            ratio = (f"{res['speedup_ours_over_naive']:.2f}x (paired {res['speedup_paired_median']:.2f}x, "
                     f"CPU time {res['speedup_cpu_time']:.2f}x, fastest steps {res['speedup_fastest_steps']:.2f}x)"
                     if name == "ours" else "1.00x")
            lines.append(
                f"| {label} | {name} ({imp['compute_dtype']}) | {imp['step_seconds_median']:.2f} | "
                f"{imp['videos_per_s']:.1f} | {imp['flops_per_step'] / 1e9:.1f} | {imp['flops_per_s'] / 1e9:.1f} | "
                f"{imp['fraction_of_peak']:.3f} | {ratio} | {imp['step_cpu_seconds_median']:.2f} |")
    if any(imp["fraction_of_peak"] > 1 for res in report["results"] for imp in res["impls"].values()):
        lines.append("\nA fraction above 1 means every peak sample met a busy machine: rerun when it is quieter.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed steps per implementation, no extra warm-up")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the FLOP-counting step (default 1)")
    parser.add_argument("--settings", default="fcvid,activitynet", help="comma-separated: fcvid, activitynet")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--matmul-n", type=int, default=None, help="size of the peak matrix product")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc mallopt: no mmap for large blocks, no trimming (saves page faults)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_train.json"), help="JSON report")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        parser.error(f"unknown setting(s) {unknown}; choose from {sorted(SETTINGS)}")
    if args.threads < 1 or steps < 1 or warmup < 0:
        parser.error("--threads and --steps must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    mallopt = keep_freed_memory() if args.keep_freed_memory else False
    if args.keep_freed_memory and not mallopt:
        print("warning: --keep-freed-memory needs glibc; running with the default allocator", file=sys.stderr)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    n = args.matmul_n or (8192 if device.type == "cuda" else 4096)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "warmup": warmup, "steps": steps, "keep_freed_memory": mallopt,
        "loadavg_start": list(os.getloadavg()), "results": [],
    }
    peaks = [MatmulPeak(device, d, n) for d in dtypes]
    for peak in peaks:
        peak.sample(reps=5)
    for name in names:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        report["results"].append(bench_setting(SETTINGS[name], device, warmup, steps, args.seed, peaks))
    for peak in peaks:
        peak.sample(reps=5)
    report["matmul_peak"] = {dtype_name(p.dtype): p.to_dict() for p in peaks}
    report["loadavg_end"] = list(os.getloadavg())
    for res in report["results"]:
        for imp in res["impls"].values():
            imp["fraction_of_peak"] = imp["flops_per_s"] / report["matmul_peak"][imp["compute_dtype"]]["best"]
    table = markdown(report)
    report["markdown"] = table
    print(table)
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
