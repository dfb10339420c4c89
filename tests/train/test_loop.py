"""fit() behaviour users rely on: accumulation equivalence, exact resume, the non-finite guard,
early stopping on val loss or a monitored metric, any batch source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.checkpoint.store import find_checkpoint, load_train_state, load_weights
from lmforge.data.loader import BatchSource, MicroBatch, TokenBatches
from lmforge.errors import NonFiniteLossError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.loop import EarlyStopping, TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.step import accumulate_gradients

CPU = torch.device("cpu")


def model_cfg() -> DecoderConfig:
    return DecoderConfig(
        arch="llama", vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32, dropout=0.1
    )


def tokens(n: int = 4000, seed: int = 0) -> np.ndarray:
    # a learnable stream: a noisy repeating pattern
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(64, dtype=np.uint16), n // 64 + 1)[:n]
    noise = rng.integers(0, 64, n, dtype=np.uint16)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


def test_accumulation_k_micro_batches_equals_one_big_batch() -> None:
    torch.manual_seed(0)
    cfg = model_cfg().model_copy(update={"dropout": 0.0})
    model = Decoder(cfg)
    x = torch.randint(0, 64, (8, 16))
    y = torch.randint(0, 64, (8, 16))
    y[1, :5] = -100  # masked positions make micro-batches unequal: means of means would differ

    def grads(micro: list) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss, _ = accumulate_gradients(model, micro, "fp32", CPU)
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    big_loss, big = grads([(x, y)])
    acc_loss, acc = grads([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    for a, b in zip(big, acc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def run(
    run_dir: Path,
    max_steps: int,
    resume: bool = False,
    batches: Any = None,
    fit_kw: dict | None = None,
    optimizer: str = "adamw",
    **train_kw,
) -> list[dict]:
    torch.manual_seed(0)
    cfg = model_cfg()
    model = Decoder(cfg)
    opt = build_optimizer(model, OptimConfig(name=optimizer, lr=3e-3))
    data = tokens()
    batches = batches or TokenBatches(data[:3600], cfg.context_length, 4, seed=0)
    resume_from = find_checkpoint(run_dir) if resume else None
    if resume_from is not None:
        load_weights(model, resume_from)
    train = TrainConfig(
        max_steps=max_steps,
        batch_size=4,
        grad_accum=2,
        eval_every=5,
        save_every=5,
        log_every=1,
        device="cpu",
        **train_kw,
    )
    fit(
        model,
        opt,
        batches,
        train,
        peak_lr=3e-3,
        sched=SchedConfig(warmup_steps=3),
        run_dir=run_dir,
        device=CPU,
        checkpoint_files={"config.yaml": "model: {}\n"},
        resume_from=resume_from,
        **({"val_tokens": data[3600:], "val_bytes": 400} | (fit_kw or {})),
    )
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_loss_curve_identical_fp32(tmp_path: Path, optimizer: str) -> None:
    full = run(tmp_path / "full", max_steps=12, optimizer=optimizer)
    # interrupted run: same config (max_steps=12), stopped by a checkpoint at step 5 and a kill
    run(tmp_path / "cut", max_steps=12, keep_last=10, optimizer=optimizer)
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert ckpts, "checkpoints were written"
    # restart from step 5: point latest at it, as if the process died right after saving it
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step-000005\n")
    resumed = run(tmp_path / "cut", max_steps=12, resume=True, keep_last=10, optimizer=optimizer)
    losses = lambda events: [(e["step"], e["loss"]) for e in events if "loss" in e]  # noqa: E731
    assert losses(resumed) == losses(full)  # bit-identical, every step 1…12
    vals = lambda events: [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]  # noqa: E731
    assert vals(resumed) == vals(full)


def test_nonfinite_loss_is_skipped_then_stops_with_causes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Decoder(model_cfg())
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    with torch.no_grad():
        model.norm_f.weight.fill_(float("nan"))
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    batches = TokenBatches(tokens(), 16, 2, seed=0)
    train = TrainConfig(
        max_steps=10, batch_size=2, eval_every=100, save_every=100, device="cpu", max_nonfinite=3
    )
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        fit(
            model,
            opt,
            batches,
            train,
            peak_lr=1e-3,
            sched=SchedConfig(warmup_steps=1),
            run_dir=tmp_path,
            device=CPU,
            checkpoint_files={},
        )
    assert torch.equal(before, model.blocks[0].attn.qkv.weight)  # no update was applied
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("skipped" in e for e in events) == 3


def test_early_stopping_stops_and_keeps_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Script the val losses so the test checks the stopping rule, not how fast a model overfits.
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    monkeypatch.setattr("lmforge.train.loop.stream_loss_sum", lambda *a, **k: (next(scripted), 1))
    events = run(tmp_path, max_steps=100, early_stop_patience=2, keep_last=1)
    evals = [e for e in events if "val_loss" in e]
    assert [e["val_loss"] for e in evals] == [
        3.0,
        2.0,
        2.5,
        2.6,
    ]  # stopped after 2 evals without improvement
    assert evals[-1]["step"] == 20
    assert (tmp_path / "checkpoints" / "best").read_text().strip() == "step-000010"
    assert (
        tmp_path / "checkpoints" / "step-000010" / "model.safetensors"
    ).is_file()  # best survives pruning


def test_early_stopping_rule_min_and_max() -> None:
    stop = EarlyStopping(patience=2)
    assert [stop.update(v) for v in (3.0, 2.0, 2.5)] == [True, True, False] and not stop.should_stop
    assert not stop.update(2.0) and stop.should_stop  # equal is no improvement
    assert stop.state_dict() == {"best_val_loss": 2.0, "bad_evals": 2}  # the checkpoint keys
    acc = EarlyStopping(patience=0, mode="max")  # 0: never stop
    assert [acc.update(v) for v in (0.5, 0.7, 0.6, 0.6, 0.6)] == [True, True, False, False, False]
    assert acc.best == -0.7 and not acc.should_stop  # kept as a loss: the saved best_val_loss
    again = EarlyStopping(patience=2, mode="max")
    again.load_state_dict({"best_val_loss": -0.7, "bad_evals": 1, "step": 9})
    assert not again.update(0.69) and again.should_stop


def test_monitored_metric_decides_best_checkpoint_and_early_stop(tmp_path: Path) -> None:
    # no val_tokens: the evaluate() metric alone decides (classify, mlm); higher is better
    scripted = iter([0.5, 0.8, 0.7, 0.6, 0.9])
    events = run(
        tmp_path, max_steps=100, early_stop_patience=2, keep_last=1,
        fit_kw={"val_tokens": None, "evaluate": lambda m: {"val_acc": next(scripted)},
                "monitor": "val_acc", "monitor_mode": "max"},
    )  # fmt: skip
    assert [(e["step"], e["val_acc"]) for e in events if "val_acc" in e] == [
        (5, 0.5), (10, 0.8), (15, 0.7), (20, 0.6),
    ]  # fmt: skip
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "best").read_text().strip() == "step-000010"
    assert (ckpts / "latest").read_text().strip() == "step-000020"  # saved on stopping
    state = load_train_state(ckpts / "step-000020")
    assert (state["best_val_loss"], state["bad_evals"]) == (-0.8, 2)


class _Counting:
    """A batch source by composition, no inheritance: what ``BatchSource`` asks for."""

    def __init__(self, inner: TokenBatches) -> None:
        self.inner, self.context, self.calls = inner, inner.context, 0

    def next_batch(self) -> MicroBatch:
        self.calls += 1
        return self.inner.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.calls = state["calls"]


def test_any_batch_source_trains_and_resumes_exactly(tmp_path: Path) -> None:
    source = lambda: _Counting(TokenBatches(tokens()[:3600], 16, 4, seed=0))  # noqa: E731
    assert isinstance(source(), BatchSource)
    full = run(tmp_path / "full", max_steps=8, batches=source())
    run(tmp_path / "cut", max_steps=8, keep_last=10, batches=source())
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step-000005\n")
    resumed_source = source()
    resumed = run(tmp_path / "cut", max_steps=8, resume=True, batches=resumed_source)
    assert resumed_source.calls == 8 * 2  # its own state came back: 5 steps x 2 + 3 x 2
    losses = lambda events: [(e["step"], e["loss"]) for e in events if "loss" in e]  # noqa: E731
    assert losses(resumed) == losses(full)
    state = load_train_state(tmp_path / "cut" / "checkpoints" / "step-000008")
    # the train_state format old checkpoints have (they resume with these keys)
    assert set(state) == {"step", "optimizer", "data", "rng", "best_val_loss", "bad_evals", "oom"}
    assert state["oom"] == {"splits": 1, "batch_size": 4, "grad_accum": 2}
