"""Forgetting penalties: L2-SP and EWC are zero at the start, grow with the distance, pull the
weights back inside fit(); the Fisher is normalised. (Scoring what was forgotten: tests/eval.)"""

from __future__ import annotations

import torch

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.regularizers import combine, ewc_penalty, fisher_diagonal, l2sp_penalty


def tiny(vocab: int = 64) -> Decoder:
    torch.manual_seed(0)
    return Decoder(
        DecoderConfig(
            arch="llama", vocab_size=vocab, context_length=32, n_layer=1, n_head=2, d_model=16
        )
    )


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g))
        for _ in range(n)
    ]


def test_l2sp_is_half_lambda_squared_distance() -> None:
    model = tiny()
    pen = l2sp_penalty(model, lam=2.0)
    assert float(pen()) == 0.0
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    want = 0.5 * 2.0 * 0.01 * model.lm_head.weight.numel()
    assert abs(float(pen()) - want) < 1e-4 * want


def test_ewc_uses_normalised_fisher() -> None:
    model = tiny().train()
    fisher = fisher_diagonal(model, batches(), torch.device("cpu"))
    assert set(fisher) == {n for n, p in model.named_parameters() if p.requires_grad}
    flat = torch.cat([f.flatten() for f in fisher.values()])
    assert abs(float(flat.mean()) - 1.0) < 1e-4 and bool((flat >= 0).all())
    assert all(p.grad is None for p in model.parameters())  # left clean for training
    assert model.training  # eval mode only while estimating
    pen = ewc_penalty(model, fisher, lam=1.0)
    assert float(pen()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    assert float(pen()) > 0
    both = combine(pen, None, l2sp_penalty(model, 0.0))
    assert torch.allclose(both(), pen())
    assert combine(None) is None


def test_penalty_pulls_weights_back_in_fit(tmp_path) -> None:
    """fit(regularizer=...) adds the penalty's gradient: a huge λ keeps the weights in place."""
    import numpy as np

    from lmforge.data.loader import TokenBatches
    from lmforge.train.loop import TrainConfig, fit
    from lmforge.train.lr_schedule import SchedConfig
    from lmforge.train.optim import OptimConfig, build_optimizer

    tokens = np.random.default_rng(0).integers(0, 64, 2000)
    moved = {}
    for lam in (0.0, 1e4):
        model = tiny()
        start = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(
            model, OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
        )
        fit(
            model,
            opt,
            TokenBatches(tokens, 16, 4, seed=0),
            TrainConfig(max_steps=5, batch_size=4, save_every=100, eval_every=100, grad_clip=0),
            peak_lr=1e-5 if lam else 0.5,
            sched=SchedConfig(warmup_steps=0, name="constant"),
            run_dir=tmp_path / str(lam),
            device=torch.device("cpu"),
            checkpoint_files={},
            regularizer=l2sp_penalty(model, lam) if lam else None,
        )
        moved[lam] = sum(
            float((p - s).abs().sum()) for p, s in zip(model.parameters(), start, strict=True)
        )
    assert moved[1e4] < moved[0.0] / 100
