"""LR schedule values at known steps; optimizer names and parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.lr_schedule import SchedConfig, lr_at
from lmforge.train.optim import (
    OPTIMIZERS,
    MuonWithAdamW,
    OptimConfig,
    build_optimizer,
    newton_schulz,
    param_groups,
)


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


def test_muon_step_matches_torch_muon_and_adamw_keeps_the_rest() -> None:
    """lmforge's Muon takes torch.optim.Muon's step on the block matrices (q, k and v of the
    fused projection as three matrices) and AdamW's on the head, embeddings and norms
    (Newton-Schulz in bf16 as torch runs it, to compare exactly)."""
    torch.manual_seed(0)
    cfg = DecoderConfig(
        arch="llama", vocab_size=40, context_length=8, n_layer=1, n_head=2, d_model=16
    )
    model, reference = Decoder(cfg), Decoder(cfg)
    reference.load_state_dict(model.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 40, (2, 8))
    for m in (model, reference):
        m(idx).square().mean().backward()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=0.02, weight_decay=0.1))
    assert isinstance(optimizer, MuonWithAdamW)
    optimizer.ns_dtype = torch.bfloat16
    optimizer.step()
    named = dict(reference.named_parameters())
    matrices = [p for n, p in named.items() if (".attn." in n or ".mlp." in n) and "qkv" not in n]
    # q, k and v as the separate Linears torch's Muon would see (the fused rows are q, k, v)
    qkv = reference.blocks[0].attn.qkv.weight
    pieces = [nn.Parameter(w.detach().clone()) for w in qkv.split(16)]
    for piece, grad in zip(pieces, qkv.grad.split(16), strict=True):
        piece.grad = grad.clone()
    others = [p for n, p in named.items() if "norm" in n or "emb" in n]
    muon = torch.optim.Muon(
        matrices + pieces, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    muon.step()
    with torch.no_grad():
        qkv.copy_(torch.cat(pieces))
    groups = [
        {"params": [reference.lm_head.weight], "weight_decay": 0.1},  # untied head: decayed
        {"params": others, "weight_decay": 0.0},
    ]
    torch.optim.AdamW(groups, lr=0.02, betas=(0.9, 0.95)).step()
    for name, p in model.named_parameters():
        ours, theirs = p.detach() - start[name], named[name].detach() - start[name]
        assert theirs.norm() > 0, name
        assert (ours - theirs).norm() / theirs.norm() < 1e-5, name


def test_newton_schulz_in_fp32_orthogonalises() -> None:
    """The fp32 iteration (CPUs without fast bf16) gives what Muon needs: every singular value
    of the result in Muon's band around 1, whatever the gradient's scale and shape."""
    torch.manual_seed(0)
    for shape in [(96, 32), (32, 96), (64, 40)]:  # a square Gaussian has σ_min ≈ 0
        grad = torch.randn(shape) @ torch.diag(torch.logspace(-1, 0, shape[1]))  # condition 10
        s = torch.linalg.svdvals(newton_schulz(grad * 1e3, torch.float32))
        assert s.min() > 0.5 and s.max() < 1.5, (shape, s.min(), s.max())
