"""Which device a run uses, and that device's peak FLOP/s (for model FLOPs utilisation)."""

from __future__ import annotations

import os
import time

import torch

from lmforge.errors import ConfigError
from lmforge.train.precision import precision_error

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets: (bf16/fp16 tensor core, fp32).
# Sources: NVIDIA A100 datasheet (2021), H100 SXM datasheet (2023), H200 product brief (2024),
# RTX 4090 Ada whitepaper (2022, fp16 accumulate-in-fp32 rate), L4 / A10 datasheets.
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "RTX 4090": (165e12, 82.6e12),
    "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: no CUDA device is visible; use cpu or auto")
    return device


def setup_device(
    name: str, num_threads: int | None = None, precision: str | None = None
) -> torch.device:
    """The run's device (``resolve_device``), checked against ``precision``; on the CPU also
    torch's thread count. Every recipe starts with this (then ``distributed.setup``).

    Ranks started on one machine (torchrun's ``LOCAL_WORLD_SIZE``) share its cores: each gets
    at most cores / ranks threads, since more only thrash.
    """
    device = resolve_device(name)
    if precision is not None and (err := precision_error(precision, device)):
        raise ConfigError(err)
    if device.type == "cpu":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local_ranks > 1:
            per_rank = max(1, (os.cpu_count() or 1) // local_ranks)
            num_threads = min(num_threads or per_rank, per_rank)
        if num_threads:
            torch.set_num_threads(num_threads)
    return device


def measure_matmul_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a square matmul on the CPU with the current thread count."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: first call allocates and picks kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from) for MFU; (None, reason) when unknown."""
    low = precision in ("bf16-mixed", "fp16-mixed", "bf16")
    if device.type == "cpu":
        flops = measure_matmul_flops(torch.bfloat16 if low else torch.float32)
        return (
            flops,
            f"measured: {'bf16' if low else 'fp32'} 1024² matmul, {torch.get_num_threads()} threads",
        )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (tensor, fp32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return (tensor if low else fp32), f"data sheet: {key}"
        return None, f"unknown GPU {name!r}: no MFU"
    return None, f"no peak known for {device.type}"
