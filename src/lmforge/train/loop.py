"""``fit()``: the one training loop every recipe shares.

It owns the subtle parts of training so that no recipe re-implements them: the step itself
(accumulation with the loss normalised by tokens, autocast and loss scaling, clipping, the
non-finite guard, out-of-memory recovery: ``train/step.py``), evaluation with the best
checkpoint and early stopping, checkpoint cadence, the data cursor, and a clean stop on
SIGINT/SIGTERM that writes a checkpoint first.
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
from lmforge.data.loader import BatchSource
from lmforge.errors import TrainingInterrupted
from lmforge.eval.lm import lm_metrics, stream_loss_sum
from lmforge.models.decoder import token_loss_sum
from lmforge.train import distributed
from lmforge.train.layer_stats import LayerStats
from lmforge.train.lr_schedule import SchedConfig, lr_at
from lmforge.train.metrics_log import MetricsLog, ProgressLine
from lmforge.train.oom import OomRecovery, retry_on_oom, split_micro_batches
from lmforge.train.precision import auto_precision, grad_scaler
from lmforge.train.step import (
    LossFn,
    StepOutcome,
    StepParts,
    accumulate_gradients,
    nonfinite_error,
    normalized_loss,
    train_step,
)
from lmforge.train.threads import thread_governor

# the step's parts were defined here before train/step.py; importers of these names keep working
__all__ = [
    "EarlyStopping",
    "FitResult",
    "TrainConfig",
    "accumulate_gradients",
    "fit",
    "normalized_loss",
    "split_micro_batches",
]


class TrainConfig(Section):
    max_steps: int = Field(1000, gt=0, description="optimizer steps")
    batch_size: int = Field(16, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    eval_every: int = Field(250, gt=0, description="steps between evaluations on the val split")
    save_every: int = Field(500, gt=0, description="steps between checkpoints")
    keep_last: int = Field(2, gt=0, description="step checkpoints kept (plus the best)")
    seed: int = Field(1337, description="seed of weights init, data order and dropout")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16", "auto"] = Field(
        "fp32",
        description="numeric precision; auto = bf16-mixed where the device has fast bfloat16, "
        "else fp16-mixed (CUDA) or fp32 (CPU), resolved when the config is read",
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
    log_layer_stats: bool = Field(
        False,
        description="at logged steps, record per-layer gradient norms, update/weight ratios and "
        "dead MLP units in metrics.jsonl for `lmforge doctor` (not with FSDP/TP)",
    )
    adapt_threads: bool = Field(
        True,
        description="CPU: run on fewer threads while other processes keep cores busy, and "
        "take them back when they stop (train/threads.py); false = keep num_threads fixed",
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

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_precision(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("precision") == "auto":
            from lmforge.train.device import resolve_device  # device imports this module

            device = resolve_device(str(data.get("device", "auto")))
            data = {**data, "precision": auto_precision(device)}
        return data

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


@dataclass
class _Pace:
    """Training tokens and seconds: since the last logged step (the window) and in total."""

    window_tokens: int = 0
    window_time: float = 0.0
    window_data_time: float = 0.0  # of window_time, waiting for batches (the doctor checks it)
    train_tokens: int = 0
    train_time: float = 0.0

    def add(self, seconds: float, tokens: int) -> None:
        self.window_time += seconds
        self.train_time += seconds
        self.window_tokens += tokens
        self.train_tokens += tokens

    @property
    def window_tokens_per_s(self) -> float:
        return self.window_tokens / self.window_time if self.window_time > 0 else 0.0

    def new_window(self) -> None:
        self.window_tokens, self.window_time, self.window_data_time = 0, 0.0, 0.0


@dataclass
class EarlyStopping:
    """The best evaluation score so far and the evaluations since it last improved.

    One rule for the best checkpoint and early stopping, whatever is watched (val loss, or a
    metric of ``evaluate`` in ``mode`` max: higher is better). ``best`` is kept as a loss
    (lower is better: a max metric negated), which is what checkpoints store as
    ``best_val_loss``.
    """

    patience: int  # evaluations without improvement before stopping; 0 = never stop
    mode: Literal["min", "max"] = "min"
    best: float = math.inf
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        """Count one evaluation's ``value``; True when it is the best so far."""
        score = value if self.mode == "min" else -value
        if score < self.best:
            self.best, self.bad_evals = score, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def stop_reason(self, watched: str) -> str:
        """Why training stops now (``watched``: what the scores are of), or ``""``."""
        if not self.should_stop:
            return ""
        return f"early stopping: no {watched} improvement in {self.bad_evals} evals"

    def state_dict(self) -> dict[str, float | int]:
        return {"best_val_loss": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, train_state: dict[str, Any]) -> None:
        self.best, self.bad_evals = train_state["best_val_loss"], train_state["bad_evals"]


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


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: BatchSource,
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
    loss_fn: LossFn = token_loss_sum,
    monitor: str | None = None,
    monitor_mode: Literal["min", "max"] = "min",
) -> FitResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (from a checkpoint's step on resume).

    ``model`` is the plain module (weights already loaded when resuming); ``fit`` compiles it
    itself when ``cfg.compile`` so that checkpoints keep the plain parameter names.
    ``train_batches`` is any ``BatchSource`` (``data/loader.py``); its ``context`` is the
    window length of the ``val_tokens`` evaluation (loss, ppl, and bpb given ``val_bytes``).
    ``regularizer()``, if given, is a scalar added to every step's loss before the optimizer
    step (EWC, L2-SP: ``train/regularizers.py``); the logged ``loss`` stays the data loss and the
    penalty is logged as ``reg``. ``evaluate(model)``, if given, runs at every eval step and
    its metrics go into metrics.jsonl (e.g. retained-task metrics while fine-tuning).
    ``loss_fn`` replaces next-token cross-entropy (classification heads); ``monitor`` names a
    metric of ``evaluate`` that then decides the best checkpoint and early stopping instead of
    val_loss (``monitor_mode`` max: higher is better; the saved ``best_val_loss`` is then its
    negation). Distributed (``parallel`` from ``distributed.setup``): ``model`` is what
    ``distributed.parallelize`` returned; every rank calls ``fit``, only rank 0 logs and
    shows progress, checkpoints are written collectively.
    """
    scaler = grad_scaler(cfg.precision, device)
    stopper = EarlyStopping(cfg.early_stop_patience, monitor_mode if monitor else "min")
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = _restore(resume_from, parallel, model, optimizer, train_batches, scaler, stopper)
    step = state.get("step", 0)
    oom = OomRecovery.resume(cfg, run_dir, parallel, state.get("oom", {}))
    threads = thread_governor(cfg.adapt_threads, device)

    forward = torch.compile(model) if cfg.compile else model
    distributed.unwrap(model).activation_checkpointing = cfg.activation_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stats = LayerStats(distributed.unwrap(model)) if cfg.log_layer_stats else None
    parts = StepParts(
        forward, optimizer, params, cfg.precision, device, scaler, parallel, loss_fn,
        cfg.grad_clip, regularizer, stats.on_gradients if stats else None,
    )  # fmt: skip
    log = MetricsLog(run_dir, resume_step=step) if parallel.is_main else _Silent()
    progress = ProgressLine(cfg.max_steps, start=step) if parallel.is_main else _Silent()

    def note(event: dict[str, Any], message: str = "") -> None:
        log.log(event)
        if message:
            progress.message(message)

    if (resumed := oom.resumed_event(step)) is not None:
        note(resumed, f"out of memory earlier: micro-batches of {resumed['micro_batch']} "
             f"({resumed['micro_batches']} per step, effective batch unchanged), evaluation "
             f"batches of {resumed['eval_batch_size']}")  # fmt: skip

    def save(is_best: bool = False) -> Path:
        state = _train_state(step, optimizer, train_batches, stopper, oom, scaler)
        if parallel.active:
            return distributed.save_checkpoint(
                parallel, run_dir, step, model, optimizer, state, checkpoint_files,
                cfg.keep_last, is_best,
            )  # fmt: skip
        return save_checkpoint(
            run_dir, step, model, state, checkpoint_files, cfg.keep_last, is_best
        )

    result = FitResult(step=step, stop_reason="max_steps", best_val_loss=stopper.best)
    pace, nonfinite_run = _Pace(), 0
    last_ckpt: Path | None = None
    try:
        with _stop_on_signals() as signals:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(step, peak_lr, cfg.max_steps, sched)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [train_batches.next_batch() for _ in range(cfg.grad_accum)]
                pace.window_data_time += time.perf_counter() - t0
                logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                if stats is not None and logged:
                    stats.begin()
                out = train_step(parts, micro, oom, step + 1, note)
                step += 1
                pace.add(time.perf_counter() - t0, out.tokens)

                nonfinite_run = 0 if out.finite else nonfinite_run + 1
                if not out.finite:
                    note({"step": step, "skipped": "non-finite loss or gradient",
                          "loss": out.loss, "lr": lr},
                         f"step {step}: non-finite loss/gradient ({out.loss}, {out.grad_norm}); "
                         "step skipped")  # fmt: skip
                    if nonfinite_run >= cfg.max_nonfinite:
                        raise nonfinite_error(nonfinite_run, step, peak_lr)
                tokens_per_s = pace.window_tokens_per_s
                if logged:
                    log.log(_train_event(step, out, lr, pace, (flops_per_token, peak_flops), stats))
                    pace.new_window()
                if threads is not None and (n := threads.update()) is not None:
                    note({"step": step, "threads": n}, f"other processes' load: {n} threads")
                progress.update(step, f"loss {out.loss:.3f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s")

                stop_reason, is_best = "", False
                eval_due = step % cfg.eval_every == 0 or step == cfg.max_steps
                if eval_due and (val_tokens is not None or evaluate is not None):
                    metrics = _evaluate(
                        forward, model, train_batches.context, val_tokens, val_bytes, evaluate,
                        cfg.precision, device, oom, step, note,
                    )  # fmt: skip
                    result.last_eval = {**result.last_eval, **metrics}
                    watched = monitor or ("val_loss" if val_tokens is not None else None)
                    if watched is not None:
                        is_best = stopper.update(metrics[watched])
                        stop_reason = stopper.stop_reason(monitor or "val")
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
    result.step, result.best_val_loss, result.checkpoint = step, stopper.best, last_ckpt
    result.train_seconds = pace.train_time
    result.tokens_per_s = pace.train_tokens / pace.train_time if pace.train_time > 0 else 0.0
    return result


def _restore(
    resume_from: Path,
    parallel: distributed.Parallel,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: BatchSource,
    scaler: torch.amp.GradScaler | None,
    stopper: EarlyStopping,
) -> dict[str, Any]:
    """Load a checkpoint's training state into the optimizer, data cursor, RNGs, loss scaler
    and early-stopping record (the weights are already loaded); returns the state."""
    state = load_train_state(resume_from)
    distributed.load_optimizer(parallel, model, optimizer, resume_from, state)
    train_batches.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    stopper.load_state_dict(state)
    return state


def _train_event(
    step: int,
    out: StepOutcome,
    lr: float,
    pace: _Pace,
    flops: tuple[float | None, float | None],
    stats: LayerStats | None,
) -> dict[str, Any]:
    """A logged step's metrics.jsonl line: ``data_frac``, the share of the window spent waiting
    for batches; ``mfu`` when ``flops`` (per token, peak/s) are known; ``layers``: ``stats``."""
    tokens_per_s = pace.window_tokens_per_s
    event = {"step": step, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm}
    event.update(
        tokens_per_s=tokens_per_s, data_frac=round(pace.window_data_time / pace.window_time, 4)
    )
    if out.reg is not None:
        event["reg"] = out.reg
    flops_per_token, peak_flops = flops
    if flops_per_token and peak_flops:
        event["mfu"] = tokens_per_s * flops_per_token / peak_flops
    if stats is not None:
        event["layers"] = stats.end()
    return event


def _train_state(
    step: int,
    optimizer: torch.optim.Optimizer,
    train_batches: BatchSource,
    stopper: EarlyStopping,
    oom: OomRecovery,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """What ``train_state.pt`` holds to resume exactly at ``step`` (``_restore`` reads it back)."""
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "data": train_batches.state_dict(),
        "rng": rng_state(),
        **stopper.state_dict(),  # best_val_loss, bad_evals
        "oom": oom.state_dict(),  # the OOM split so far (train/oom.py)
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def _evaluate(
    forward: nn.Module,
    model: nn.Module,
    context: int,
    val_tokens: np.ndarray | None,
    val_bytes: int | None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    precision: str,
    device: torch.device,
    oom: OomRecovery,
    step: int,
    note: Callable[..., None],
) -> dict[str, float]:
    """One evaluation at ``step``: loss, ppl, bpb of ``val_tokens`` in windows of ``context``
    (an out-of-memory error halves only the evaluation batch), then ``evaluate(model)``'s
    metrics; each part is logged as one event. Returns all metrics."""
    out: dict[str, float] = {}

    def logged(metrics: dict[str, float]) -> dict[str, float]:
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        note({"step": step, **metrics}, f"step {step}: {shown}")
        return metrics

    if val_tokens is not None:
        loss_sum, n = retry_on_oom(
            lambda: stream_loss_sum(forward, val_tokens, context, oom.eval_batch, device, precision),
            lambda e: oom.give_up_eval(e, step),
            lambda: note({"step": step, "oom": "eval", "eval_batch_size": oom.halve_eval_batch()}),
            device,
        )  # fmt: skip
        out |= logged(lm_metrics(loss_sum, n, val_bytes))
    if evaluate is not None:
        out |= logged(evaluate(model))
    return out
