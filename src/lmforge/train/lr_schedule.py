"""Learning-rate schedules: a pure function of the step, so resuming needs only the step.

Every schedule starts with a linear warm-up from 0 to the peak over ``warmup_steps`` (the
first step uses lr·1/warmup, never exactly 0, so no step is wasted). A warm-up as long as the
run or longer (the usual first edit: ``--train.max_steps=20`` on a preset with 22 warm-up steps)
is shortened to a tenth of the run, with a note, instead of refusing the run.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import Field

from lmforge.config import Section

log = logging.getLogger(__name__)


class SchedConfig(Section):
    name: Literal["constant", "linear", "cosine", "step", "wsd"] = Field(
        "cosine",
        description="decay after warm-up; wsd = warm-up, stable at the peak, then a linear decay",
    )
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final lr as a fraction of the peak (linear, cosine)"
    )
    step_size: int = Field(1000, gt=0, description="steps between decays (step)")
    gamma: float = Field(0.5, gt=0, le=1, description="decay factor every step_size steps (step)")
    decay_fraction: float = Field(
        0.3, gt=0, le=1, description="share of the run spent decaying at the end (wsd)"
    )


def lr_at(step: int, peak_lr: float, max_steps: int, cfg: SchedConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``max_steps``."""
    warmup = warmup_steps(cfg, max_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "step":
        return peak_lr * cfg.gamma ** ((step - warmup) // cfg.step_size)
    min_lr = peak_lr * cfg.min_lr_ratio
    if cfg.name == "wsd":
        # Warm-up-stable-decay (Hu et al. 2024, MiniCPM): the peak until the last
        # decay_fraction of the run, then straight down to min_lr.
        decay = max(1, round(cfg.decay_fraction * max_steps))
        start = max(warmup, max_steps - decay)
        progress = min(1.0, max(0, step - start) / max(1, max_steps - start))
        return peak_lr - (peak_lr - min_lr) * progress
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.name == "linear":
        return peak_lr - (peak_lr - min_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: SchedConfig, max_steps: int) -> int:
    """The warm-up actually used: ``cfg.warmup_steps``, or a tenth of the run when that is not
    shorter than the run (a warm-up that never ends would leave no step at the peak and no decay)."""
    return cfg.warmup_steps if cfg.warmup_steps < max_steps else max_steps // 10


def check_warmup(sched: SchedConfig, max_steps: int) -> None:
    """Config check shared by every recipe: say so when the warm-up is shortened to fit the run."""
    if sched.warmup_steps >= max_steps > 0:
        log.warning(
            "note: sched.warmup_steps (%d) is not smaller than train.max_steps (%d): the "
            "warm-up is shortened to %d steps (a tenth of the run); set --sched.warmup_steps "
            "to choose another",
            sched.warmup_steps,
            max_steps,
            warmup_steps(sched, max_steps),
        )
