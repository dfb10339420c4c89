"""One optimizer step (``train/step.py``): OOM retry with the same data and dropout masks, the
non-finite guard, loss scaling's own skip, the regularizer's share of the gradient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.models.decoder import Decoder, DecoderConfig, token_loss_sum
from lmforge.train import distributed
from lmforge.train.loop import TrainConfig
from lmforge.train.oom import OomRecovery
from lmforge.train.step import StepParts, accumulate_gradients, apply_gradients, train_step

CPU = torch.device("cpu")


def model(seed: int = 0, dropout: float = 0.1) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        arch="llama",
        vocab_size=64,
        context_length=16,
        n_layer=2,
        n_head=2,
        d_model=32,
        dropout=dropout,
    )
    return Decoder(cfg)


def parts(m: torch.nn.Module, **kw: Any) -> StepParts:
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    args: dict[str, Any] = dict(
        model=m, optimizer=opt, params=list(m.parameters()), precision="fp32", device=CPU,
        scaler=None, parallel=distributed.SINGLE, loss_fn=token_loss_sum, grad_clip=1.0,
        regularizer=None,
    )  # fmt: skip
    return StepParts(**(args | kw))


def oom_state(tmp: Path, splits: int = 1) -> OomRecovery:
    train = TrainConfig(batch_size=4, grad_accum=1, device="cpu")
    return OomRecovery(train, tmp, distributed.SINGLE, splits=splits, eval_batch=4)


def batch(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g))
    ]


def test_oom_redoes_the_step_split_with_the_same_dropout_masks(tmp_path: Path) -> None:
    # reference: the step computed in micro-batches of 2 from the start
    ref = model()
    torch.manual_seed(123)
    ref_out = train_step(parts(ref), batch(), oom_state(tmp_path, splits=2), 1, lambda e, m: None)

    # the same step unsplit, running out of memory in the second block — after the first
    # block's dropout has drawn its masks, so a retry without the saved RNG state would differ
    m = model()
    fails = []

    def out_of_memory_on_4_rows(module: torch.nn.Module, args: tuple) -> None:
        if args[0].size(0) == 4:
            fails.append(1)
            raise torch.OutOfMemoryError("injected: 4 rows do not fit")

    m.blocks[1].register_forward_pre_hook(out_of_memory_on_4_rows)
    oom, notes = oom_state(tmp_path), []
    torch.manual_seed(123)
    out = train_step(parts(m), batch(), oom, 1, lambda e, msg: notes.append(e))

    assert fails == [1] and oom.splits == 2  # later steps start split
    assert notes == [{"step": 1, "oom": "split", "micro_batch": 2, "micro_batches": 2}]
    assert (out.loss, out.grad_norm, out.tokens) == (ref_out.loss, ref_out.grad_norm, 64)
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)  # bit-identical update: same rows, same masks
        assert a.grad is None  # zeroed for the next step


def test_oom_with_recovery_off_or_nothing_left_to_split_raises(tmp_path: Path) -> None:
    m = model(dropout=0.0)

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        raise torch.OutOfMemoryError("x")

    m.blocks[0].register_forward_pre_hook(out_of_memory)
    off = oom_state(tmp_path)
    off.train = off.train.model_copy(update={"oom_recovery": False})
    with pytest.raises(torch.OutOfMemoryError, match="^x$"):
        train_step(parts(m), batch(), off, 1, lambda e, msg: None)
    # always out of memory: split down to one row, then a message that says what to do
    with pytest.raises(torch.OutOfMemoryError, match="nothing left to split"):
        train_step(parts(m), batch(), oom_state(tmp_path), 1, lambda e, msg: None)


def test_nonfinite_gradient_skips_the_update(tmp_path: Path) -> None:
    m = model(dropout=0.0)
    with torch.no_grad():
        m.norm_f.weight.fill_(float("nan"))
    before = [p.detach().clone() for p in m.parameters()]
    out = train_step(parts(m), batch(), oom_state(tmp_path), 1, lambda e, msg: None)
    assert not out.finite
    for a, b in zip(m.parameters(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert a.grad is None


def test_loss_scaler_skips_inf_gradients_itself() -> None:
    # With a scaler an overflow is routine: its own step skips the update and lowers the scale;
    # the step is not counted as non-finite (that would stop fp16 runs while the scale settles).
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    overflow = torch.tensor([1.0, float("inf"), 1.0])
    scaler.scale((w * overflow).sum()).backward()  # gradient: scale x (1, inf, 1)
    p = parts(torch.nn.Linear(1, 1), optimizer=opt, params=[w], scaler=scaler)
    loss, norm, finite = apply_gradients(p, torch.tensor(2.0))
    assert finite and loss == 2.0 and norm == float("inf")
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    assert scaler.get_scale() == 2.0**15
    # without a scaler the same gradient is a skipped, non-finite step
    w.grad = torch.tensor([1.0, float("inf"), 1.0])
    _, _, finite = apply_gradients(
        parts(torch.nn.Linear(1, 1), optimizer=opt, params=[w]), torch.tensor(2.0)
    )
    assert not finite and torch.equal(w.detach(), torch.ones(3))


def test_regularizer_adds_its_gradient_and_the_logged_loss_stays_the_data_loss(
    tmp_path: Path,
) -> None:
    m, ref = model(dropout=0.0), model(dropout=0.0)
    anchor = [p.detach().clone() + 0.5 for p in m.parameters()]  # a penalty with a gradient

    def penalty(mod: torch.nn.Module) -> torch.Tensor:
        return sum(((p - a) ** 2).sum() for p, a in zip(mod.parameters(), anchor, strict=True))

    p = parts(m, regularizer=lambda: penalty(m), grad_clip=0.0)
    out = train_step(p, batch(), oom_state(tmp_path), 1, lambda e, msg: None)
    # the reference: the data loss's gradient plus the penalty's, by hand
    data_loss, _ = accumulate_gradients(ref, batch(), "fp32", CPU)
    penalty(ref).backward()
    with torch.no_grad():
        for q in ref.parameters():
            q -= 0.1 * q.grad
    assert out.loss == data_loss.item()
    assert out.reg == pytest.approx(penalty(model(dropout=0.0)).item())
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
