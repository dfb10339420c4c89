"""Activation checkpointing none / selective / full: same maths, less memory, planned and
predicted by the memory estimator."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from lmforge.config import validate_config
from lmforge.errors import ConfigError
from lmforge.models.activation_checkpointing import selective_policy
from lmforge.models.decoder import Decoder, DecoderConfig, token_loss_sum
from lmforge.plan.autofit import SAFETY_MARGIN, apply_memory_budget, plan_fit, train_workload
from lmforge.plan.estimate import Workload, estimate
from lmforge.plan.hardware import flops_per_token
from lmforge.plan.tracker import track_peak
from lmforge.train.loop import TrainConfig, accumulate_gradients
from lmforge.train.optim import OptimConfig, build_optimizer

CPU = torch.device("cpu")
MODES = ("none", "selective", "full")


def tiny(arch: str, dropout: float = 0.0, **kw) -> DecoderConfig:
    return DecoderConfig(
        arch=arch, vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=32,
        n_kv_head=2 if arch == "llama" else None, dropout=dropout, **kw,
    )  # fmt: skip


def loss_and_grads(
    model: Decoder, mode: str, x: torch.Tensor, segments: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.activation_checkpointing = mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in every mode
    loss_sum, n = token_loss_sum(model(x[:, :-1], segments=segments), x[:, 1:])
    (loss_sum / n).backward()
    return loss_sum.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_selective_and_full_give_the_loss_and_gradients_of_none(
    arch: str, dropout: float, packed: bool
) -> None:
    torch.manual_seed(0)
    model = Decoder(tiny(arch, dropout)).train()
    x = torch.randint(0, 97, (2, 17))
    # packed: row 0 holds two documents (6 + 10 tokens), row 1 one
    segments = torch.tensor([[0] * 6 + [1] * 10, [0] * 16]) if packed else None
    loss, grads = loss_and_grads(model, "none", x, segments)
    if dropout:  # the masks matter: the loss without dropout differs
        with torch.no_grad():
            plain = token_loss_sum(model.eval()(x[:, :-1], segments=segments), x[:, 1:])[0]
        model.train()
        assert not torch.allclose(plain, loss)
    for mode in ("selective", "full"):
        loss_m, grads_m = loss_and_grads(model, mode, x, segments)
        torch.testing.assert_close(loss_m, loss, rtol=1e-6, atol=1e-6)
        for g_m, g in zip(grads_m, grads, strict=True):
            torch.testing.assert_close(g_m, g, rtol=1e-6, atol=1e-7)


def test_selective_policy_saves_matmuls_and_attention_recomputes_pointwise() -> None:
    aten = torch.ops.aten
    policy = selective_policy()
    save = CheckpointPolicy.MUST_SAVE
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        assert policy(None, op) == save
    assert policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == save
    assert policy(None, aten._scaled_dot_product_efficient_attention.default) == save
    for op in (aten.native_layer_norm.default, aten.gelu.default, aten.silu.default,
               aten.mul.Tensor, aten.add.Tensor, aten.cat.default, aten._softmax.default,
               aten.bernoulli_.float, aten._to_copy.default):  # fmt: skip
        assert policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE
    # attention dropout: a fused kernel draws random numbers, so it is rerun, not saved
    no_attn = selective_policy(save_attention=False)
    assert no_attn(None, aten._scaled_dot_product_flash_attention.default) != save
    assert no_attn(None, aten.mm.default) == save


def _measured_peak(cfg: DecoderConfig, mode: str, precision: str, B: int, T: int) -> int:
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.activation_checkpointing = mode
    opt = build_optimizer(model, OptimConfig())

    def step() -> None:
        xy = (torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T)))
        accumulate_gradients(model, [xy], precision, CPU)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer states exist from the second step on
    with track_peak(model, opt) as peak:
        step()
    return peak["Total"]


@pytest.mark.parametrize(
    "arch,precision", [("gpt2", "fp32"), ("llama", "fp32"), ("llama", "bf16-mixed")]
)
def test_peak_memory_full_below_selective_below_none_and_predicted(
    arch: str, precision: str
) -> None:
    # small vocabulary, long rows: activations, not the logits, decide the peak
    cfg = DecoderConfig(
        arch=arch, vocab_size=256, context_length=128, n_layer=2, n_head=4, d_model=128,
        n_kv_head=2 if arch == "llama" else None,
    )  # fmt: skip
    measured = {m: _measured_peak(cfg, m, precision, 4, 128) for m in MODES}
    assert measured["full"] < measured["selective"] < measured["none"]
    for m in MODES:
        w = Workload(batch=4, seq=128, precision=precision, checkpointing=m)
        assert estimate(cfg, w).peak == pytest.approx(measured[m], rel=0.10), m


def test_old_boolean_configs_still_load() -> None:
    assert TrainConfig(activation_checkpointing=True).activation_checkpointing == "full"
    assert TrainConfig(activation_checkpointing=False).activation_checkpointing == "none"
    assert TrainConfig().activation_checkpointing == "none"
    yaml_data = {"activation_checkpointing": "selective"}
    assert validate_config(TrainConfig, yaml_data, "x.yaml").activation_checkpointing == "selective"
    with pytest.raises(pydantic.ValidationError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing="some")
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        validate_config(TrainConfig, {"activation_checkpointing": "partial"}, "x.yaml")


def test_selective_costs_no_matmul_flops() -> None:
    cfg = tiny("llama")
    none = flops_per_token(cfg, 32, "none")
    assert flops_per_token(cfg, 32, "selective") == none
    assert flops_per_token(cfg, 32, "full") == pytest.approx(none * 4 / 3)


def _needs(cfg: DecoderConfig, mode: str) -> float:
    return estimate(cfg, Workload(batch=1, seq=cfg.context_length, checkpointing=mode)).peak


def test_plan_prefers_the_fastest_checkpointing_that_fits(tmp_path: Path) -> None:
    cfg = DecoderConfig(arch="llama", vocab_size=256, context_length=512, n_layer=4, d_model=128)
    need = {m: _needs(cfg, m) for m in MODES}
    assert need["full"] < need["selective"] < need["none"]
    w = Workload(batch=1, seq=512)

    def chosen(budget: float) -> str:
        plan = plan_fit(cfg, w, budget / (1 - SAFETY_MARGIN), global_batch=1)
        return plan["activation_checkpointing"]

    assert chosen(need["none"] * 1.01) == "none"  # none fits: no recompute at all
    assert chosen((need["none"] + need["selective"]) / 2) == "selective"
    assert chosen((need["selective"] + need["full"]) / 2) == "full"

    # train.memory_budget maps the plan onto the TrainConfig field
    budget = (need["none"] + need["selective"]) / 2 / (1 - SAFETY_MARGIN)
    train = TrainConfig(batch_size=1, memory_budget=f"{budget:.0f}")
    w = train_workload(train, OptimConfig(), cfg.context_length, "cpu")
    new, _ = apply_memory_budget(train, w, cfg, "cpu", tmp_path)
    assert new.activation_checkpointing == "selective"
