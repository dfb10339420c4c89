"""Penalties that keep a fine-tune close to what the base knew (catastrophic forgetting).

fisher_diagonal    EWC's diagonal Fisher information, estimated on retained batches
ewc_penalty        λ/2 · Σ F̂ᵢ (θᵢ − θ*ᵢ)²   (Kirkpatrick et al. 2017)
l2sp_penalty       λ/2 · Σ (θᵢ − θ⁰ᵢ)²       (Li et al. 2018, "L2-SP": pull to the start point)

Both penalties are closures for ``fit(regularizer=...)``, over the trainable parameters only.
Measuring what was forgotten (the retained data's metric before/after) is evaluation:
``eval/retained.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.eval.mode import eval_mode
from lmforge.models.decoder import token_loss_sum


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_diagonal(
    model: nn.Module, batches: list[tuple[torch.Tensor, ...]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters: the mean over the rows of
    ``batches`` of the squared gradient of each row's mean token loss, normalised to mean 1 over
    all entries so that λ means the same for any model size (plain EWC leaves F̂ unnormalised).

    Per row, not per batch: at the end of training on the retained task the batch-mean gradient
    is close to zero (the gradients of its rows cancel), so its square says little about which
    weights matter; measured on bench/forgetting.py, a batch-level F̂ let EWC lose the retained
    task even at λ = 10⁴."""
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    rows = 0
    with eval_mode(model, grad=True):  # gradients, but no dropout noise in them
        for x, y, *extra in batches:
            for r in range(x.size(0)):
                kwargs = {k: v[r : r + 1].to(device) for k, v in extra[0].items()} if extra else {}
                model.zero_grad(set_to_none=True)
                loss, n = token_loss_sum(
                    model(x[r : r + 1].to(device), **kwargs), y[r : r + 1].to(device)
                )
                if n == 0:
                    continue
                (loss / n).backward()
                rows += 1
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.detach() ** 2
    fisher = {name: f / max(1, rows) for name, f in fisher.items()}
    model.zero_grad(set_to_none=True)
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
    return {n: f / mean for n, f in fisher.items()}


def ewc_penalty(
    model: nn.Module, fisher: dict[str, torch.Tensor], lam: float
) -> Callable[[], torch.Tensor]:
    """λ/2 · Σ F̂ᵢ (θᵢ − θ*ᵢ)², θ* = the weights now (before fine-tuning)."""
    params = _trainable(model)
    anchor = {n: p.detach().clone() for n, p in params.items()}

    def penalty() -> torch.Tensor:
        terms = [(fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items()]
        return 0.5 * lam * torch.stack(terms).sum()

    return penalty


def l2sp_penalty(model: nn.Module, lam: float) -> Callable[[], torch.Tensor]:
    """λ/2 · Σ (θᵢ − θ⁰ᵢ)² over the trainable parameters, θ⁰ = the weights now."""
    params = _trainable(model)
    anchor = {n: p.detach().clone() for n, p in params.items()}

    def penalty() -> torch.Tensor:
        return (
            0.5 * lam * torch.stack([((p - anchor[n]) ** 2).sum() for n, p in params.items()]).sum()
        )

    return penalty


def combine(*terms: Callable[[], torch.Tensor] | None) -> Callable[[], torch.Tensor] | None:
    live = [t for t in terms if t is not None]
    if not live:
        return None
    return lambda: torch.stack([t() for t in live]).sum()
