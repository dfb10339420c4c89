"""``fit()``: the one training loop every recipe shares.

It owns the subtle parts of a step so that no recipe re-implements them: gradient
accumulation with the loss normalised by tokens, autocast and loss scaling, clipping, the
non-finite guard, evaluation and early stopping, checkpoint cadence, the data cursor, and a
clean stop on SIGINT/SIGTERM that writes a checkpoint first.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lmforge.checkpoint.store import load_train_state, rng_state, save_checkpoint, set_rng_state
from lmforge.config import Section
from lmforge.data.loader import TokenBatches
from lmforge.errors import NonFiniteLossError, TrainingInterrupted
from lmforge.eval.lm import lm_metrics, stream_loss_sum
from lmforge.models.decoder import token_loss_sum
from lmforge.train import distributed
from lmforge.train.lr_schedule import SchedConfig, lr_at
from lmforge.train.metrics_log import MetricsLog, ProgressLine
from lmforge.train.oom import (
    AgreedOutOfMemory,
    free_memory,
    nothing_to_split,
    record_and_stop,
    recorded,
    split_micro_batches,
)
from lmforge.train.precision import autocast, grad_scaler


class TrainConfig(Section):
    max_steps: int = Field(1000, gt=0, description="optimizer steps")
    batch_size: int = Field(16, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    eval_every: int = Field(250, gt=0, description="steps between evaluations on the val split")
    save_every: int = Field(500, gt=0, description="steps between checkpoints")
    keep_last: int = Field(2, gt=0, description="step checkpoints kept (plus the best)")
    seed: int = Field(1337, description="seed of weights init, data order and dropout")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"] = Field(
        "fp32", description="numeric precision"
    )
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 = no clipping")
    early_stop_patience: int = Field(
        0, ge=0, description="evals without val improvement before stopping; 0 = off"
    )
    max_nonfinite: int = Field(
        5, gt=0, description="consecutive non-finite steps tolerated before the run stops"
    )
    log_every: int = Field(10, gt=0, description="steps between train events in metrics.jsonl")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_threads: int | None = Field(
        None, gt=0, description="CPU threads for torch; null = torch's default"
    )
    compile: bool = Field(
        False, description="torch.compile the model (slow first steps, faster after)"
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none",
        description="recompute activations in backward: selective = only the cheap ops "
        "(norms, activations, RoPE, dropout; matmul and attention outputs are kept), "
        "full = whole blocks; true/false mean full/none",
    )
    eval_batch_size: int | None = Field(
        None, gt=0, description="sequences per eval batch; null = batch_size"
    )
    oom_recovery: bool = Field(
        True,
        description="on out-of-memory, redo the step with the same batch split into twice as many "
        "micro-batches (DDP ranks agree on it); an eval OOM halves only the eval batch. Where "
        "ranks cannot retry together (FSDP/TP), the run stops with a record and --resume "
        "continues from the last checkpoint with the finer split",
    )
    memory_budget: str | None = Field(
        None,
        description="e.g. 24GiB or auto (the device's free memory): choose micro-batch, "
        "accumulation and checkpointing that fit (global batch unchanged); plan in memory_plan.json",
    )
    memory_allow: list[Literal["precision", "method"]] = Field(
        [],
        description="what else memory_budget may change, only when nothing fits without it: "
        "precision (fp32 → bf16-mixed → bf16), method (finetune: full → lora → qlora)",
    )

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_from_bool(cls, v: Any) -> Any:
        return ("full" if v else "none") if isinstance(v, bool) else v  # older configs

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.device == "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(
                f"train.device must be auto, cpu, cuda or cuda:N (got {self.device!r})"
            )
        return self


class _Silent:
    """Stands in for the metrics log and progress bar on ranks other than 0."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class FitResult:
    step: int
    stop_reason: str
    last_eval: dict[str, float] = field(default_factory=dict)
    best_val_loss: float = math.inf
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    checkpoint: Path | None = None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (only in the main thread)."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def normalized_loss(loss_sum: torch.Tensor, n_tokens: int, dp_size: int = 1) -> torch.Tensor:
    """The loss to backpropagate for one micro-batch: its summed token loss (nats) divided by
    the token count of the WHOLE step on ALL data-parallel ranks, times ``dp_size``.

    Summing these over micro-batches and ranks gives (all tokens' loss) / (all tokens): the
    gradient of one big batch, not a mean of per-micro-batch or per-rank means (which
    over-weights short batches when padding or masking varies). The ``dp_size`` factor undoes
    the mean that DDP and FSDP take when they reduce gradients over ranks.
    """
    return loss_sum * dp_size / max(1, n_tokens)


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[tuple[torch.Tensor, ...]],
    precision: str,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    parallel: distributed.Parallel = distributed.SINGLE,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]] = token_loss_sum,
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
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            except torch.OutOfMemoryError:
                if not agree_on_oom or (last and in_model):
                    raise
                oom = True
            if oom:  # out of the except block: its traceback pinned the activations
                logits = loss = loss_sum = None
            agree(oom)
            if last:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss_sum.detach()
    return parallel.sum_over_data_ranks(total) / max(1, n_tokens), n_tokens


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: TokenBatches,
    cfg: TrainConfig,
    *,
    peak_lr: float,
    sched: SchedConfig,
    run_dir: Path,
    device: torch.device,
    checkpoint_files: dict[str, str | bytes | Path],
    val_tokens: np.ndarray | None = None,
    val_bytes: int | None = None,
    resume_from: Path | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    parallel: distributed.Parallel = distributed.SINGLE,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]] = token_loss_sum,
    monitor: str | None = None,
    monitor_mode: Literal["min", "max"] = "min",
) -> FitResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (from a checkpoint's step on resume).

    ``model`` is the plain module (weights already loaded when resuming); ``fit`` compiles it
    itself when ``cfg.compile`` so that checkpoints keep the plain parameter names.
    ``regularizer()``, if given, is a scalar added to every step's loss before the optimizer
    step (EWC, L2-SP: ``train/regularizers.py``); the logged ``loss`` stays the data loss and the
    penalty is logged as ``reg``. ``evaluate(model)``, if given, runs at every eval step and
    its metrics go into metrics.jsonl (e.g. retained-task metrics while fine-tuning).
    ``loss_fn`` replaces next-token cross-entropy (classification heads); ``monitor`` names a
    metric of ``evaluate`` that then decides the best checkpoint and early stopping
    (``monitor_mode`` max: higher is better; the saved ``best_val_loss`` is then its negation).
    Distributed (``parallel`` from ``distributed.setup``): ``model`` is what
    ``distributed.parallelize`` returned; every rank calls ``fit``, only rank 0 logs and
    shows progress, checkpoints are written collectively.
    """
    context = train_batches.context
    scaler = grad_scaler(cfg.precision, device)
    step, best_val, bad_evals, nonfinite_run = 0, math.inf, 0, 0
    if resume_from is not None:
        state = load_train_state(resume_from)
        distributed.load_optimizer(parallel, model, optimizer, resume_from, state)
        train_batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, best_val, bad_evals = state["step"], state["best_val_loss"], state["bad_evals"]
    # micro-batches are cut into this many parts after out-of-memory errors: as the checkpoint
    # left it, or as an OOM record of a run that stopped asks (train/oom.py)
    oom_state = state.get("oom", {}) if resume_from is not None else {}
    if (oom_state.get("batch_size"), oom_state.get("grad_accum")) != (
        cfg.batch_size,
        cfg.grad_accum,
    ):
        oom_state = {}  # resumed with another micro-batch or accumulation: start unsplit
    asked = parallel.broadcast(recorded(run_dir, cfg) if parallel.is_main else None)
    oom_splits = max(oom_state.get("splits", 1), asked.get("splits", 1))
    eval_batch_cfg = cfg.eval_batch_size or cfg.batch_size
    eval_batch = min(
        eval_batch_cfg,
        oom_state.get("eval_batch_size", 2**62),
        asked.get("eval_batch_size", 2**62),
    )

    forward = torch.compile(model) if cfg.compile else model
    distributed.unwrap(model).activation_checkpointing = cfg.activation_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(run_dir, resume_step=step) if parallel.is_main else _Silent()
    progress = ProgressLine(cfg.max_steps, start=step) if parallel.is_main else _Silent()
    result = FitResult(step=step, stop_reason="max_steps", best_val_loss=best_val)
    window_tokens, window_time, train_time, train_tokens = 0, 0.0, 0.0, 0
    last_ckpt: Path | None = None
    if oom_splits > 1 or asked:
        rows = -(-cfg.batch_size // oom_splits)
        log.log({"step": step, "oom": "resume", "micro_batch": rows,
                 "micro_batches": oom_splits * cfg.grad_accum, "eval_batch_size": eval_batch})  # fmt: skip
        progress.message(
            f"out of memory earlier: micro-batches of {rows} ({oom_splits * cfg.grad_accum} per "
            f"step, effective batch unchanged), evaluation batches of {eval_batch}"
        )
    # DDP ranks agree on an OOM split (a flag all-reduced per micro-batch); FSDP/TP forwards
    # have collectives inside them, so a rank that stops midway would deadlock the others:
    # there the rank records the OOM and the run stops (train/oom.py)
    agree_on_oom = cfg.oom_recovery and parallel.active and parallel.strategy == "ddp"

    def train_state() -> dict[str, Any]:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "data": train_batches.state_dict(),
            "rng": rng_state(),
            "best_val_loss": best_val,
            "bad_evals": bad_evals,
            # the OOM split so far, valid for this batch_size and grad_accum (train/oom.py)
            "oom": {
                "splits": oom_splits,
                "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
            }
            | ({"eval_batch_size": eval_batch} if eval_batch < eval_batch_cfg else {}),
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def save(is_best: bool = False) -> Path:
        if parallel.active:
            return distributed.save_checkpoint(
                parallel, run_dir, step, model, optimizer, train_state(), checkpoint_files,
                cfg.keep_last, is_best,
            )  # fmt: skip
        return save_checkpoint(
            run_dir, step, model, train_state(), checkpoint_files, cfg.keep_last, is_best
        )

    try:
        with _stop_on_signals() as signals:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(step, peak_lr, cfg.max_steps, sched)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [train_batches.next_batch() for _ in range(cfg.grad_accum)]
                micro = split_micro_batches(micro, oom_splits) if oom_splits > 1 else micro
                rng_before = rng_state()  # a retry sees the same dropout masks
                while True:
                    oom = False
                    try:
                        loss, n_tokens = accumulate_gradients(
                            forward, micro, cfg.precision, device, scaler, parallel, loss_fn,
                            agree_on_oom,
                        )  # fmt: skip
                    except torch.OutOfMemoryError as e:
                        if not cfg.oom_recovery:
                            raise
                        # several processes: only a split all ranks agreed on can be retried;
                        # otherwise record it and stop (the others may wait in a collective)
                        if parallel.active and not isinstance(e, AgreedOutOfMemory):
                            if micro[0][0].size(0) < 2:
                                raise nothing_to_split(micro[0][0].size(0)) from e
                            raise record_and_stop(
                                run_dir, parallel.rank, step + 1, cfg, splits=oom_splits * 2,
                                error=e,
                            ) from e  # fmt: skip
                        oom = True
                    if not oom:
                        break
                    # out of the except block: the traceback and its tensors are gone
                    optimizer.zero_grad(set_to_none=True)
                    free_memory(device)
                    micro = split_micro_batches(micro, 2)
                    oom_splits *= 2
                    set_rng_state(rng_before)
                    rows = micro[0][0].size(0)
                    log.log({"step": step + 1, "oom": "split", "micro_batch": rows,
                             "micro_batches": len(micro)})  # fmt: skip
                    progress.message(
                        f"step {step + 1}: out of memory; retrying the same batch as "
                        f"{len(micro)} micro-batches of {rows} (effective batch unchanged)"
                    )
                reg_value = None
                if regularizer is not None:
                    reg = regularizer()
                    (scaler.scale(reg) if scaler is not None else reg).backward()
                    reg_value = float(reg.detach())
                if scaler is not None:
                    scaler.unscale_(optimizer)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                clip = distributed.clip_grad_norm_ if parallel.sharded else None
                grad_norm = (clip or torch.nn.utils.clip_grad_norm_)(params, max_norm)
                loss_value, norm_value = loss.item(), grad_norm.item()
                # With a scaler, inf gradients are routine (the scale was too high): it skips them.
                finite = math.isfinite(loss_value) and (
                    scaler is not None or math.isfinite(norm_value)
                )
                if finite:
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    nonfinite_run = 0
                else:
                    nonfinite_run += 1
                    if scaler is not None:
                        scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                window_time += dt
                window_tokens += n_tokens
                train_time += dt
                train_tokens += n_tokens

                if not finite:
                    log.log(
                        {
                            "step": step,
                            "skipped": "non-finite loss or gradient",
                            "loss": loss_value,
                            "lr": lr,
                        }
                    )
                    progress.message(
                        f"step {step}: non-finite loss/gradient ({loss_value}, {norm_value}); step skipped"
                    )
                    if nonfinite_run >= cfg.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{nonfinite_run} steps in a row had a non-finite loss or gradient (step {step}). "
                            f"Likely causes: the learning rate is too high (optim.lr={peak_lr:g}; try a third), "
                            f"too little warm-up (sched.warmup_steps), fp16 overflow (use "
                            f"train.precision=bf16-mixed or fp32), or bad input data."
                        )
                tokens_per_s = window_tokens / window_time if window_time > 0 else 0.0
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    event = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value}
                    event["tokens_per_s"] = tokens_per_s
                    if reg_value is not None:
                        event["reg"] = reg_value
                    if flops_per_token and peak_flops:
                        event["mfu"] = tokens_per_s * flops_per_token / peak_flops
                    log.log(event)
                    window_tokens, window_time = 0, 0.0
                progress.update(
                    step, f"loss {loss_value:.3f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
                )

                stop_reason = ""
                is_best = False
                if val_tokens is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    while True:  # an OOM here shrinks only the evaluation batch
                        oom = False
                        try:
                            loss_sum, n = stream_loss_sum(
                                forward, val_tokens, context, eval_batch, device, cfg.precision
                            )
                        except torch.OutOfMemoryError as e:
                            if not cfg.oom_recovery or eval_batch == 1:
                                raise
                            if parallel.sharded:  # collectives in the forward: as in training
                                raise record_and_stop(
                                    run_dir, parallel.rank, step, cfg, eval_batch=eval_batch // 2,
                                    error=e,
                                ) from e  # fmt: skip
                            oom = True
                        if not oom:
                            break
                        free_memory(device)
                        eval_batch //= 2
                        log.log({"step": step, "oom": "eval", "eval_batch_size": eval_batch})
                    metrics = lm_metrics(loss_sum, n, val_bytes)
                    log.log({"step": step, **metrics})
                    result.last_eval = metrics
                    shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    progress.message(f"step {step}: {shown}")
                    if metrics["val_loss"] < best_val:
                        best_val, bad_evals, is_best = metrics["val_loss"], 0, True
                    else:
                        bad_evals += 1
                        if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                            stop_reason = f"early stopping: no val improvement in {bad_evals} evals"
                if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    extra = evaluate(model)
                    log.log({"step": step, **extra})
                    result.last_eval = {**result.last_eval, **extra}
                    progress.message(
                        f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in extra.items())
                    )
                    if monitor is not None:
                        score = extra[monitor] if monitor_mode == "min" else -extra[monitor]
                        if score < best_val:
                            best_val, bad_evals, is_best = score, 0, True
                        else:
                            bad_evals += 1
                            if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                                stop_reason = (
                                    f"early stopping: no {monitor} improvement in {bad_evals} evals"
                                )
                if parallel.any_rank(signals["stop"]):
                    last_ckpt = save(is_best)
                    raise TrainingInterrupted(step, last_ckpt)
                if step % cfg.save_every == 0 or step == cfg.max_steps or stop_reason or is_best:
                    last_ckpt = save(is_best)
                if stop_reason:
                    result.stop_reason = stop_reason
                    progress.message(stop_reason)
                    break
    finally:
        progress.close()
        log.close()
    result.step, result.best_val_loss, result.checkpoint = step, best_val, last_ckpt
    result.train_seconds = train_time
    result.tokens_per_s = train_tokens / train_time if train_time > 0 else 0.0
    return result
