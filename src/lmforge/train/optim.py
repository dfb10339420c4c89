"""Optimizers by name, with the parameter groups every recipe shares.

Weight decay applies only to matrices that multiply activations. Norm gains, biases and
embeddings are left alone: decaying them pulls scales and lookup rows towards zero without
regularising anything (nanoGPT, minGPT and most published recipes do the same).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lmforge.config import Section

OPTIMIZERS = ("adamw", "adam", "sgd", "adagrad", "rmsprop")


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd", "adagrad", "rmsprop"] = Field(
        "adamw", description="optimizer"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(
        0.1, ge=0, description="decoupled (adamw) or L2 weight decay on matrices only"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-8, gt=0, description="Adam/RMSprop/AdaGrad epsilon")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/RMSprop momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd)")
    fused: bool | None = Field(
        None, description="fused kernels (adam/adamw); null = when the device supports them"
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and everything else (norms, biases, embeddings)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named in ``cfg`` over ``param_groups(model)``.

    A tied output head shares its tensor with the token embedding, so it is not decayed
    either (it is the same parameter).
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name in ("adamw", "adam"):
        device = next(model.parameters()).device
        # Fused Adam exists for CPU and CUDA in recent torch; foreach is the portable fallback.
        fused = cfg.fused if cfg.fused is not None else device.type in ("cpu", "cuda")
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        return cls(groups, **kwargs, fused=True) if fused else cls(groups, **kwargs, foreach=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps)
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)
