"""Where training runs and how: the device, the compute precision, and where the training array lives.

The training array is either held on the device (host RAM on the CPU, GPU
memory on CUDA) in the compute dtype, or streamed from the HDF5 files batch by
batch (``conmh.loader``); :func:`plan_data` decides which.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from threadpoolctl import threadpool_limits

from .errors import ConfigError
from .loader import ResidentBatches, StreamingBatches
from .machine import cpu_model

# Data mode "auto": on the CPU, training arrays up to this size are held in
# host memory; on CUDA, arrays that take at most GPU_RESIDENT_FRACTION of the
# free GPU memory (in the compute dtype) are held there. Larger ones are streamed.
IN_MEMORY_LIMIT_BYTES = 4 << 30
GPU_RESIDENT_FRACTION = 0.5
DATA_MODES = ("auto", "memory", "stream")
PRECISIONS = ("auto", "fp32", "bf16")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def set_threads(threads: int | None) -> None:
    """Run torch and numpy's BLAS on ``threads`` threads in this process (None or 0: their defaults).

    The count changes the order of float sums (ConMH's weights, ITQ's fitted
    rotation), so runs compared bit for bit name it. BLAS is set here rather
    than left to OPENBLAS_NUM_THREADS, which Snakemake sets to a job's
    threads and a DVC stage does not.
    """
    if threads:
        torch.set_num_threads(threads)
        threadpool_limits(limits=threads, user_api="blas")


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present (this process's local rank under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and device.index is None:  # the current GPU (under torchrun: this rank's), by number
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    """``device`` with the hardware behind it, e.g. "cuda:0 (NVIDIA H200)" or "cpu (AMD EPYC)"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_model()})"


def compute_precision(precision: str = "auto") -> str:
    """``auto`` and ``fp32``: float32 on every device, as the official code trains;
    ``bf16``: bf16 autocast, asked for explicitly (other rounding, see README)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "fp32" if precision == "auto" else precision


# cuBLAS needs one of these workspace settings to be deterministic (CUDA >= 10.2); read at its first use.
CUBLAS_WORKSPACE_CONFIGS = (":4096:8", ":16:8")


@contextlib.contextmanager
def numerics(deterministic: bool = False) -> Iterator[None]:
    """float32 means float32, for the duration: no TF32 in CUDA matrix products or convolutions.

    NVIDIA's containers set ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``, which makes
    TF32 the process's default; training and encoding switch it off here
    whatever the default, and restore the caller's settings on exit.

    ``deterministic``: bit-reproducible kernels (``torch.use_deterministic_algorithms``,
    cuDNN's deterministic algorithms, a fixed cuBLAS workspace, and the math
    attention kernel, see ``conmh.model.attention``), so that a GPU run, rerun
    or resumed, ends with the same weights. What it costs: benchmarks/README.md.
    """
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        deterministic_flags(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_WORKSPACE_CONFIGS:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIGS[0]
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            flags_before,
        ) = saved
        # Set again only where it changed: the call imports torch._inductor, which cost every encode
        # process seconds at exit (benchmarks/README.md, "The default pipeline's jobs").
        if deterministic_flags() != flags_before:
            torch.use_deterministic_algorithms(flags_before[0], warn_only=flags_before[1])


def deterministic_flags() -> tuple[bool, bool]:
    """torch's deterministic-algorithms mode: (on, warn only)."""
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's context for a resolved precision: bf16 autocast, or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DataPlan:
    """Where training batches come from: the array held on the device (``resident``) or streamed."""

    resident: bool
    dtype: torch.dtype  # of the array held on the device; streamed batches are cast to it


def plan_data(
    nbytes_fp32: int, device_type: str, precision: str, mode: str = "auto", free_device_bytes: int | None = None
) -> DataPlan:
    """Decide resident or streamed for a training array of ``nbytes_fp32`` bytes in float32.

    The held array has the compute dtype (float32, or bf16 under bf16
    autocast). ``free_device_bytes`` is the free GPU memory (CUDA only).
    """
    if mode not in DATA_MODES:
        raise ConfigError(f"data mode must be one of {DATA_MODES}, got {mode!r}")
    dtype = COMPUTE_DTYPES[compute_precision(precision)]
    if mode != "auto":
        return DataPlan(resident=mode == "memory", dtype=dtype)
    held = nbytes_fp32 * dtype.itemsize // 4
    if device_type == "cuda":
        if free_device_bytes is None:
            raise ValueError("plan_data needs the free GPU memory for a CUDA device")
        return DataPlan(resident=held <= GPU_RESIDENT_FRACTION * free_device_bytes, dtype=dtype)
    return DataPlan(resident=held <= IN_MEMORY_LIMIT_BYTES, dtype=dtype)


def make_batches(feats, device: torch.device, plan: DataPlan) -> ResidentBatches | StreamingBatches:
    """The batch source of ``plan`` (see ``conmh.loader``)."""
    if plan.resident:
        return ResidentBatches(feats, device, dtype=plan.dtype)
    return StreamingBatches(feats)
