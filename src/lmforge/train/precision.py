"""Numeric precision of a training run.

fp32        weights, activations and optimizer in float32
bf16-mixed  float32 weights and optimizer; matmuls under bfloat16 autocast (CPU and CUDA)
fp16-mixed  float32 weights; float16 autocast with dynamic loss scaling (CUDA only: CPU
            autocast has no float16 kernels worth using, and bf16 needs no scaler)
bf16        weights themselves in bfloat16 ("pure" bf16; least memory, least accurate)
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"]


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
