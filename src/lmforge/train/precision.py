"""Numeric precision of a training run.

fp32        weights, activations and optimizer in float32
bf16-mixed  float32 weights and optimizer; matmuls under bfloat16 autocast (CPU and CUDA)
fp16-mixed  float32 weights; float16 autocast with dynamic loss scaling (CUDA only: CPU
            autocast has no float16 kernels worth using, and bf16 needs no scaler)
bf16        weights themselves in bfloat16 ("pure" bf16; least memory, least accurate)
auto        bf16-mixed where bfloat16 matmuls are fast, else fp16-mixed (CUDA) or fp32 (CPU);
            resolved once when the config is read, so config.yaml records the choice
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"]


def auto_precision(device: torch.device) -> str:
    """What ``train.precision=auto`` means on ``device``.

    CPUs without native bfloat16 (AVX-512 BF16/AMX; e.g. AVX2-only AMD EPYC hosts) emulate it:
    a bf16 1024² matmul measured 0.9 GFLOP/s against 53 in fp32 on such a host, so the CPU demo
    would take hours instead of minutes in bf16-mixed there. oneDNN's own check decides.
    """
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def precision_error(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device``, or None when it can."""
    if precision == "fp16-mixed" and device.type != "cuda":
        return "train.precision=fp16-mixed needs a CUDA device; on CPU use bf16-mixed"
    if (
        precision in ("bf16-mixed", "bf16")
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        return f"train.precision={precision}: this GPU has no bfloat16; use fp16-mixed"
    return None


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for forward passes (and the loss) under ``precision``."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def weight_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (its gradients underflow without one); else None."""
    if precision == "fp16-mixed":
        return torch.amp.GradScaler(device.type)
    return None
