"""A short ``fit`` of a decoder on a token stream: prune's recovery fine-tune and distill's
student training share it, so both run the one training loop (``train/loop.py``: token-
normalised accumulation, clipping, non-finite guard, checkpoints) with the same settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.data.loader import TokenBatches
from lmforge.models.decoder import token_loss_sum
from lmforge.train.loop import FitResult, TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.step import LossFn


def fit_on_tokens(
    model: nn.Module,
    tokens: np.ndarray,
    run_dir: Path,
    train: TrainConfig,
    optim: OptimConfig,
    sched: SchedConfig,
    context: int,
    loss_fn: LossFn = token_loss_sum,
    val_tokens: np.ndarray | None = None,
    val_bytes: int | None = None,
    checkpoint_files: dict[str, str | bytes | Path] | None = None,
) -> FitResult:
    """Train ``model`` (CPU) on windows of ``context`` tokens of ``tokens`` for
    ``train.max_steps`` steps; metrics and checkpoints go to ``run_dir``."""
    batches = TokenBatches(tokens, context, train.batch_size, seed=train.seed)
    optimizer = build_optimizer(model, optim)
    return fit(
        model,
        optimizer,
        batches,
        train,
        peak_lr=optim.lr,
        sched=sched,
        run_dir=run_dir,
        device=torch.device("cpu"),
        checkpoint_files=checkpoint_files or {},
        val_tokens=val_tokens,
        val_bytes=val_bytes,
        loss_fn=loss_fn,
    )
