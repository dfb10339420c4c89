"""One optimizer step: accumulate gradients over micro-batches, then clip and apply them.

``train_step`` is what ``fit`` runs once per step: backward over the step's micro-batches with
the loss normalised by tokens (``accumulate_gradients``), under autocast and loss scaling,
redone with finer micro-batches after an out-of-memory error (``train/oom.py``), then the
regularizer's gradient, unscaling, clipping (sharded under FSDP/TP), the non-finite guard and
the optimizer update (``apply_gradients``). The order of these operations, of RNG use and of
the floating-point reductions is what makes a run reproducible and its resume exact: keep it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from lmforge.checkpoint.store import rng_state, set_rng_state
from lmforge.data.loader import MicroBatch
from lmforge.errors import NonFiniteLossError
from lmforge.models.decoder import token_loss_sum
from lmforge.train import distributed
from lmforge.train.oom import AgreedOutOfMemory, OomRecovery, retry_on_oom, split_micro_batches
from lmforge.train.precision import autocast

LossFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]
"""``loss_fn(logits, y)`` → (summed loss in nats, count of scored targets)."""


def normalized_loss(loss_sum: torch.Tensor, n_tokens: int, dp_size: int = 1) -> torch.Tensor:
    """The loss to backpropagate for one micro-batch: its summed token loss (nats) divided by
    the token count of the WHOLE step on ALL data-parallel ranks, times ``dp_size``.

    Summing these over micro-batches and ranks gives (all tokens' loss) / (all tokens): the
    gradient of one big batch, not a mean of per-micro-batch or per-rank means (which
    over-weights short batches when padding or masking varies). The ``dp_size`` factor undoes
    the mean that DDP and FSDP take when they reduce gradients over ranks.
    """
    return loss_sum * dp_size / max(1, n_tokens)


def _scaled(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    return scaler.scale(loss) if scaler is not None else loss


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    precision: str,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    parallel: distributed.Parallel = distributed.SINGLE,
    loss_fn: LossFn = token_loss_sum,
    agree_on_oom: bool = False,
) -> tuple[torch.Tensor, int]:
    """Backward over all micro-batches of one step; returns (mean loss per token, tokens),
    both over all data-parallel ranks (the same values on every rank).

    The loss is normalised by ``normalized_loss``. Gradients are synchronised across ranks
    only in the last micro-batch's backward (``no_sync`` before it).
    A micro-batch is (x, y) or (x, y, model keyword tensors), e.g. SFT's packed ``segments``.
    ``loss_fn(logits, y)`` → (summed loss, count); every ``y`` element != -100 counts, so a
    classifier's (B,) labels count examples and multi-label (B, K) targets count label slots.
    ``agree_on_oom`` (DDP): after each micro-batch, and after the last one's forward and loss
    (before its synchronising backward), the ranks all-reduce an out-of-memory flag; when any
    rank ran out, every rank raises ``AgreedOutOfMemory`` at the same point, so all can split
    and retry in step. Re-raised instead (``fit`` then records it and stops, ``train/oom.py``):
    an OOM inside the last backward (gradient all-reduce in flight) and one inside the last
    micro-batch's model forward — DDP arms its gradient reducer at the end of a synchronising
    forward, so that rank would retry unarmed while the others are armed: mismatched all-reduces
    (seen on gloo as "Received data size doesn't match expected size").
    """
    local_tokens = sum(int((mb[1] != -100).sum()) for mb in micro_batches)
    n_tokens = int(parallel.sum_over_data_ranks(torch.tensor(local_tokens, device=device)))
    total = torch.zeros((), device=device)

    def agree(oom: bool) -> None:
        if agree_on_oom and parallel.any_rank(oom):
            raise AgreedOutOfMemory("out of memory on at least one rank; all ranks retry")

    for i, (x, y, *extra) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else distributed.no_sync(model):
            oom, in_model = False, True
            try:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                kwargs = {k: v.to(device) for k, v in extra[0].items()} if extra else {}
                with autocast(precision, device):
                    logits = model(x, **kwargs)
                in_model = False
                loss_sum, _ = loss_fn(logits, y)
                # The loss keeps what its backward needs (fp32 logits: the log-softmax; 16-bit
                # logits: the logits themselves, models/decoder.py token_loss_sum); holding the
                # logits here too would keep a batch x seq x vocab tensor alive through the
                # whole backward instead of only the loss's.
                logits = None
                loss = normalized_loss(loss_sum, n_tokens, parallel.dp_size)
                if not last:
                    _scaled(loss, scaler).backward()
            except torch.OutOfMemoryError:
                if not agree_on_oom or (last and in_model):
                    raise
                oom = True
            if oom:  # out of the except block: its traceback pinned the activations
                logits = loss = loss_sum = None
            agree(oom)
            if last:
                _scaled(loss, scaler).backward()
        total += loss_sum.detach()
    return parallel.sum_over_data_ranks(total) / max(1, n_tokens), n_tokens


@dataclass(frozen=True)
class StepParts:
    """What every optimizer step of a run uses; ``fit`` builds it once."""

    model: nn.Module  # what to call: compiled and/or DDP/FSDP-wrapped
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # the trainable ones: clipped together
    precision: str
    device: torch.device
    scaler: torch.amp.GradScaler | None  # fp16-mixed only
    parallel: distributed.Parallel
    loss_fn: LossFn
    grad_clip: float  # max global gradient norm; 0 = no clipping
    regularizer: Callable[[], torch.Tensor] | None  # a penalty added to the loss (EWC, L2-SP)
    # called after clipping, before the update (per-layer statistics: train/layer_stats.py)
    inspect_gradients: Callable[[], None] | None = None


@dataclass
class StepOutcome:
    loss: float  # mean data loss per token over all micro-batches and ranks (nats)
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # scored targets over all micro-batches and ranks
    finite: bool  # False: the update was skipped
    reg: float | None = None  # the regularizer's value, if there is one


def train_step(
    parts: StepParts,
    micro_batches: list[MicroBatch],
    oom: OomRecovery,
    step: int,
    note: Callable[[dict[str, Any], str], None],
) -> StepOutcome:
    """Optimizer step number ``step`` (1-based) on ``micro_batches``; the caller has set the lr.

    Micro-batches are cut into ``oom.splits`` parts first. After an out-of-memory error that
    may be retried (``OomRecovery.give_up_training``), the step is redone from zeroed gradients
    and the same RNG state (the same dropout masks) with every piece cut in two; ``note(event,
    message)`` then reports it. The effective batch, the data and the normalisation stay the
    same, so the update equals the unsplit one up to float summation order.
    """
    micro = split_micro_batches(micro_batches, oom.splits) if oom.splits > 1 else micro_batches
    rng_before = rng_state()

    def attempt() -> tuple[torch.Tensor, int]:
        return accumulate_gradients(
            parts.model, micro, parts.precision, parts.device, parts.scaler, parts.parallel,
            parts.loss_fn, oom.agree,
        )  # fmt: skip

    def shrink() -> None:
        nonlocal micro
        parts.optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial gradients
        micro = split_micro_batches(micro, 2)
        oom.splits *= 2
        set_rng_state(rng_before)
        rows = micro[0][0].size(0)
        note(
            {"step": step, "oom": "split", "micro_batch": rows, "micro_batches": len(micro)},
            f"step {step}: out of memory; retrying the same batch as {len(micro)} micro-batches "
            f"of {rows} (effective batch unchanged)",
        )

    loss, n_tokens = retry_on_oom(
        attempt, lambda e: oom.give_up_training(e, micro[0][0].size(0), step), shrink, parts.device
    )
    reg_value = None
    if parts.regularizer is not None:
        reg = parts.regularizer()
        _scaled(reg, parts.scaler).backward()
        reg_value = float(reg.detach())
    loss_value, norm_value, finite = apply_gradients(parts, loss)
    return StepOutcome(loss_value, norm_value, n_tokens, finite, reg_value)


def apply_gradients(parts: StepParts, loss: torch.Tensor) -> tuple[float, float, bool]:
    """Unscale, clip, and step the optimizer unless the loss or the gradient is not finite;
    the gradients are zeroed either way. ``loss`` is the step's mean loss, for the guard.
    Returns (loss, gradient norm before clipping, whether the update was applied)."""
    scaler, optimizer = parts.scaler, parts.optimizer
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = parts.grad_clip if parts.grad_clip > 0 else math.inf
    clip = distributed.clip_grad_norm_ if parts.parallel.sharded else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(parts.params, max_norm)
    if parts.inspect_gradients is not None:
        parts.inspect_gradients()
    loss_value, norm_value = loss.item(), grad_norm.item()
    # With a scaler, inf gradients are routine (the scale was too high): it skips them.
    finite = math.isfinite(loss_value) and (scaler is not None or math.isfinite(norm_value))
    if finite:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    elif scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, finite


def nonfinite_error(run: int, step: int, peak_lr: float) -> NonFiniteLossError:
    """What stops the run after ``run`` skipped steps in a row (``train.max_nonfinite``)."""
    return NonFiniteLossError(
        f"{run} steps in a row had a non-finite loss or gradient (step {step}). Likely causes: "
        f"the learning rate is too high (optim.lr={peak_lr:g}; try a third), too little "
        f"warm-up (sched.warmup_steps), fp16 overflow (use train.precision=bf16-mixed or "
        f"fp32), or bad input data."
    )
