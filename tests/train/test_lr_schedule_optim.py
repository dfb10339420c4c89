"""LR schedule values at known steps; optimizer names and parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.lr_schedule import SchedConfig, lr_at
from lmforge.train.optim import OPTIMIZERS, OptimConfig, build_optimizer, param_groups


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("cosine", 0, 0.1),  # warm-up: (0+1)/10 of the peak
        ("cosine", 9, 1.0),  # last warm-up step reaches the peak
        ("cosine", 10, 1.0),
        ("cosine", 55, 0.1 + 0.9 * 0.5),  # half way through the decay
        ("cosine", 100, 0.1),  # floor at min_lr_ratio
        ("linear", 55, 1.0 - 0.9 * 0.5),
        ("linear", 100, 0.1),
        ("constant", 80, 1.0),
        ("step", 29, 1.0),  # 10 warm-up + 20 = first decay at step 30
        ("step", 30, 0.5),
        ("step", 50, 0.25),
        ("wsd", 10, 1.0),  # stable at the peak ...
        ("wsd", 70, 1.0),  # ... until the last 30 % of the run
        ("wsd", 85, 1.0 - 0.9 * 0.5),  # half way down the decay
        ("wsd", 100, 0.1),
    ],
)
def test_schedule_values_at_known_steps(name: str, step: int, expected: float) -> None:
    cfg = SchedConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, step_size=20, gamma=0.5)
    assert lr_at(step, 1.0, 100, cfg) == pytest.approx(expected)


def test_cosine_is_monotone_after_warmup() -> None:
    cfg = SchedConfig(name="cosine", warmup_steps=5)
    lrs = [lr_at(s, 3e-4, 200, cfg) for s in range(5, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert math.isclose(lrs[0], 3e-4)


def test_no_weight_decay_on_norms_biases_and_embeddings() -> None:
    model = Decoder(
        DecoderConfig(arch="gpt2", vocab_size=50, context_length=8, n_layer=1, n_head=2, d_model=8)
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(
        n.endswith("weight") and "norm" not in n and "emb" not in n for n in decayed
    )
    assert "tok_emb.weight" in {names[id(p)] for p in no_decay["params"]}
    # every parameter exactly once (the tied head is the embedding)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_by_name_takes_a_step(name: str) -> None:
    model = Decoder(
        DecoderConfig(arch="llama", vocab_size=50, context_length=8, n_layer=1, n_head=2, d_model=8)
    )
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2))
    before = model.blocks[0].mlp.up.weight.detach().clone()
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].mlp.up.weight)


def test_unknown_optimizer_is_rejected_with_allowed_names() -> None:
    with pytest.raises(ValueError, match="adamw"):
        OptimConfig(name="lion")
