"""Learning-rate schedules: a pure function of the step, so resuming needs only the step.

Every schedule starts with a linear warm-up from 0 to the peak over ``warmup_steps`` (the
first step uses lr·1/warmup, never exactly 0, so no step is wasted).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from lmforge.config import Section


class SchedConfig(Section):
    name: Literal["constant", "linear", "cosine", "step"] = Field(
        "cosine", description="decay after warm-up"
    )
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final lr as a fraction of the peak (linear, cosine)"
    )
    step_size: int = Field(1000, gt=0, description="steps between decays (step)")
    gamma: float = Field(0.5, gt=0, le=1, description="decay factor every step_size steps (step)")


def lr_at(step: int, peak_lr: float, max_steps: int, cfg: SchedConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``max_steps``."""
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "step":
        return peak_lr * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    min_lr = peak_lr * cfg.min_lr_ratio
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.name == "linear":
        return peak_lr - (peak_lr - min_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def check_warmup(sched: SchedConfig, max_steps: int) -> None:
    """Config check shared by every recipe: warm-up must end before training does."""
    if sched.warmup_steps >= max_steps:
        raise ValueError(
            f"sched.warmup_steps ({sched.warmup_steps}) must be smaller than train.max_steps "
            f"({max_steps})"
        )
