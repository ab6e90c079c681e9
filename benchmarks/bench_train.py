"""Training throughput of ConMH: our step against a naive step shaped like the official code.

Run:  python benchmarks/bench_train.py [--quick] [--out bench_train.json] [--threads N]

For the ``small`` preset at the FCVID setting (4096-dim features, 25 frames,
batch 512, mask 0.75, 64 bits) and the ActivityNet setting (2048, 30 frames,
batch 128, mask 0.5, 64 bits) it times warm training steps (forward, backward
and the Adam update) of ``conmh.train.training_step`` and of
``tests/helpers/naive_reference.naive_training_step`` (the same maths, checked by
``tests/unit/test_naive_reference.py``). Each implementation runs in its own
process, set up as it is shipped: ours as ``conmh train`` sets up its process
(glibc keeps freed memory, ``conmh.allocator``), the naive step with the
defaults the official code runs with; one process at a time, in rounds of
alternating order so that a change of load on the machine hits all alike.
``--with-bf16`` adds our step under CPU bf16 autocast (``conmh train
--precision bf16``: opt-in, other rounding). It reports videos/s, the FLOPs of
one step (forward + backward, counted by ``torch.utils.flop_counter``), achieved
FLOP/s, that as a fraction of the machine's matrix-multiply peak measured in
the same run (a large ``torch.mm`` with the same thread count), and the ratio
ours / naive. It prints a Markdown table and writes the numbers as JSON.

On every device "ours" runs in float32 (TF32 off on CUDA), as ``conmh train``
does by default and the official code does; ``--with-bf16`` adds it under bf16
autocast. Each is compared with the peak of its own dtype.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers package

from conmh.allocator import keep_freed_memory  # noqa: E402
from conmh.atomic import write_text_atomic  # noqa: E402
from conmh.device import autocast_context, compute_precision, numerics  # noqa: E402
from conmh.model import ConMH, ModelConfig  # noqa: E402
from conmh.recipes import Recipe, get_recipe  # noqa: E402
from conmh.train import StepOutput, training_step  # noqa: E402
from helpers.naive_reference import naive_training_step  # noqa: E402

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
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(
        q, k, v
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *args, out_shape=None, **kwargs: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


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
        return {
            "n": self.n,
            "dtype": dtype_name(self.dtype),
            "best": self.best,
            "median": statistics.median(self.rates),
            "samples": len(self.rates),
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Runner:
    """One implementation's model, optimiser and step, as ``conmh.train.train`` runs them."""

    def __init__(
        self, step: StepFn, cfg: ModelConfig, recipe: Recipe, device: torch.device, precision: str, seed: int
    ) -> None:
        torch.manual_seed(seed)
        self.step, self.recipe, self.device, self.precision = step, recipe, device, precision
        self.model = ConMH(cfg).to(device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)

    def loss_and_backward(self, feats: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.precision):
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


@dataclass(frozen=True)
class Impl:
    """One implementation as it is run: its step, compute precision and process set-up."""

    name: str
    step: StepFn
    precision: str  # "auto" resolves as in ``conmh train``
    tuned_allocator: bool  # what ``conmh train`` does to its process (conmh.allocator)


def implementations(with_bf16: bool, device: torch.device) -> list[Impl]:
    impls = [
        Impl("ours", training_step, "auto", tuned_allocator=True),
        Impl("naive", naive_training_step, "fp32", tuned_allocator=False),
    ]
    if with_bf16:
        impls.insert(1, Impl("ours-bf16", training_step, "bf16", tuned_allocator=True))
    return impls


def _worker(conn, impl: Impl, setting: Setting, device: str, threads: int, seed: int) -> None:
    """Child process: build one implementation, then run what the parent asks for."""
    with numerics():  # float32 without TF32 for this whole process, as conmh train computes
        allocator = keep_freed_memory() if impl.tuned_allocator else False
        torch.set_num_threads(threads)
        dev = torch.device(device)
        recipe = get_recipe(setting.dataset)
        cfg = ModelConfig.from_preset(
            "small", feature_dim=setting.feature_dim, frames=setting.frames, nbits=setting.nbits
        )
        feats = torch.randn(
            recipe.batch_size, setting.frames, setting.feature_dim, generator=torch.Generator().manual_seed(seed)
        ).to(dev)
        runner = Runner(impl.step, cfg, recipe, dev, compute_precision(impl.precision), seed)
        conn.send({"precision": runner.precision, "tuned_allocator": allocator})
        while (order := conn.recv()) != "stop":
            conn.send(runner.count_flops(feats) if order == "flops" else runner.train_step(feats))


class Worker:
    """Parent-side handle of one implementation's process."""

    def __init__(self, impl: Impl, setting: Setting, device: torch.device, threads: int, seed: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, impl, setting, str(device), threads, seed), daemon=True)
        self.process.start()
        self.info = self.conn.recv()

    def ask(self, order: str):
        self.conn.send(order)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join(timeout=60)


@dataclass
class Timings:
    info: dict | None = None
    flops: int = 0
    times: list[float] = field(default_factory=list)  # wall seconds of each timed step
    cpu_times: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # median wall seconds of each round


def bench_setting(
    setting: Setting,
    impls: list[Impl],
    device: torch.device,
    threads: int,
    warmup: int,
    steps: int,
    rounds: int,
    seed: int,
    peaks: list[MatmulPeak],
) -> dict:
    """Each round runs each implementation in a fresh process, one at a time (only its memory is
    resident); the order is reversed every other round, so that load drift hits all alike."""
    timings = {impl.name: Timings() for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            t = timings[impl.name]
            worker = Worker(impl, setting, device, threads, seed)
            try:
                t.info = worker.info
                if r == 0:
                    t.flops = worker.ask("flops")  # the first warm-up step
                else:
                    worker.ask("step")
                for _ in range(warmup):
                    worker.ask("step")
                block = [worker.ask("step") for _ in range(steps)]
            finally:
                worker.close()
            t.times += [wall for wall, _ in block]
            t.cpu_times += [cpu for _, cpu in block]
            t.rounds.append(statistics.median(wall for wall, _ in block))
            for peak in peaks:
                peak.sample()
    recipe = get_recipe(setting.dataset)
    result = {
        "dataset": setting.dataset,
        "feature_dim": setting.feature_dim,
        "frames": setting.frames,
        "batch_size": recipe.batch_size,
        "mask_ratio": recipe.mask_ratio,
        "nbits": setting.nbits,
        "preset": "small",
        "impls": {},
    }
    naive = timings["naive"]
    for name, w in timings.items():
        sec = statistics.median(w.times)
        result["impls"][name] = {
            "compute_dtype": "bfloat16" if w.info["precision"] == "bf16" else "float32",
            "tuned_allocator": w.info["tuned_allocator"],
            "step_seconds_median": sec,
            "step_seconds_min": min(w.times),
            "step_seconds": w.times,
            # CPU time is less sensitive than wall time to other processes on a shared machine.
            "step_cpu_seconds_median": statistics.median(w.cpu_times),
            "step_cpu_seconds": w.cpu_times,
            "videos_per_s": recipe.batch_size / sec,
            "flops_per_step": w.flops,
            "flops_per_s": w.flops / sec,
            # Speed over the naive step: ratio of medians; median of the per-round ratios
            # (the blocks of a round run back to back); CPU-time ratio; ratio of the fastest
            # steps, those least disturbed by intermittent load.
            "speedup": statistics.median(naive.times) / sec,
            "speedup_paired_median": statistics.median(n / o for n, o in zip(naive.rounds, w.rounds)),
            "speedup_cpu_time": statistics.median(naive.cpu_times) / statistics.median(w.cpu_times),
            "speedup_fastest_steps": min(naive.times) / min(w.times),
        }
    return result


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}, {report['threads']} threads; load average "
        f"{report['loadavg_start'][0]:.2f} at start, {report['loadavg_end'][0]:.2f} at end; "
        f"{report['rounds']} rounds x {report['steps']} timed steps each (medians); each implementation in "
        "its own process, one at a time.",
        "Matrix-multiply peak: "
        + ", ".join(
            f"{p['dtype']} {p['best'] / 1e9:.1f} GFLOP/s (best of {p['samples']}, n={p['n']}, "
            f"median {p['median'] / 1e9:.1f})"
            for p in report["matmul_peak"].values()
        ),
        "",
        "| setting | step | s/step (median) | videos/s | GFLOP/step (fwd+bwd) | GFLOP/s | fraction of peak "
        "| speed / naive | CPU s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        label = (
            f"{res['dataset']} (D={res['feature_dim']}, T={res['frames']}, B={res['batch_size']}, "
            f"mask {res['mask_ratio']})"
        )
        for name, imp in res["impls"].items():
            ratio = (
                f"{imp['speedup']:.2f}x (paired {imp['speedup_paired_median']:.2f}x, "
                f"CPU time {imp['speedup_cpu_time']:.2f}x, fastest steps {imp['speedup_fastest_steps']:.2f}x)"
                if name != "naive"
                else "1.00x"
            )
            setup = ", kept freed memory" if imp["tuned_allocator"] else ""
            lines.append(
                f"| {label} | {name} ({imp['compute_dtype']}{setup}) | {imp['step_seconds_median']:.2f} | "
                f"{imp['videos_per_s']:.1f} | {imp['flops_per_step'] / 1e9:.1f} | {imp['flops_per_s'] / 1e9:.1f} | "
                f"{imp['fraction_of_peak']:.3f} | {ratio} | {imp['step_cpu_seconds_median']:.2f} |"
            )
    if any(imp["fraction_of_peak"] > 1 for res in report["results"] for imp in res["impls"].values()):
        lines.append("\nA fraction above 1 means every peak sample met a busy machine: rerun when it is quieter.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 timed steps, no extra warm-up")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds; each starts every implementation afresh, in alternating order (default 2)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation and round (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per round after the first (warm-up) step (default 1)"
    )
    parser.add_argument("--settings", default="fcvid,activitynet", help="comma-separated: fcvid, activitynet")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--matmul-n", type=int, default=None, help="size of the peak matrix product")
    parser.add_argument(
        "--with-bf16",
        action="store_true",
        help="also time our step under bf16 autocast (conmh train --precision bf16)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_train.json"), help="JSON report")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        parser.error(f"unknown setting(s) {unknown}; choose from {sorted(SETTINGS)}")
    if args.threads < 1 or steps < 1 or rounds < 1 or warmup < 0:
        parser.error("--threads, --steps and --rounds must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    n = args.matmul_n or (8192 if device.type == "cuda" else 4096)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" or args.with_bf16 else [])

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "warmup": warmup,
        "steps": steps,
        "rounds": rounds,
        "loadavg_start": list(os.getloadavg()),
        "results": [],
    }
    peaks = [MatmulPeak(device, d, n) for d in dtypes]
    with numerics():  # float32 peaks without TF32, as training computes
        for peak in peaks:
            peak.sample(reps=5)
    for name in names:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        report["results"].append(
            bench_setting(
                SETTINGS[name],
                implementations(args.with_bf16, device),
                device,
                args.threads,
                warmup,
                steps,
                rounds,
                args.seed,
                peaks,
            )
        )
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
