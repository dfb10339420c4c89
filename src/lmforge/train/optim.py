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

OPTIMIZERS = ("adamw", "adam", "sgd", "adagrad", "rmsprop", "muon")


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd", "adagrad", "rmsprop", "muon"] = Field(
        "adamw",
        description="optimizer; muon = torch's Muon for the hidden matrices, AdamW for the rest",
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(
        0.1, ge=0, description="decoupled (adamw) or L2 weight decay on matrices only"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-8, gt=0, description="Adam/RMSprop/AdaGrad epsilon")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/RMSprop momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd)")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's momentum (muon)")
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
    if cfg.name == "muon":
        return MuonWithAdamW(model, cfg)
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


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the matrices inside the blocks, AdamW for everything else.

    Muon orthogonalises each matrix's momentum (Newton-Schulz) before the update; it is meant
    for hidden 2-D weights only — embeddings, the output head, norm gains and biases keep AdamW
    (Jordan et al. 2024; Moonshot's "Muon is scalable", 2025). Muon's step is rescaled to
    AdamW's update size (``adjust_lr_fn="match_rms_adamw"``), so one ``optim.lr`` and one
    weight decay serve both. One optimizer object for the loop: its ``param_groups`` are the
    two inner optimizers' groups (the same dicts, so the LR schedule reaches both), and its
    state dict holds both states for exact resume.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig) -> None:
        outer = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Linear):
            outer.add(id(head.weight))
        matrices, adam_groups = [], param_groups(model, cfg.weight_decay)
        for group in adam_groups:
            kept = []
            for p in group["params"]:
                (matrices if p.dim() == 2 and id(p) not in outer else kept).append(p)
            group["params"] = kept
        self.muon = torch.optim.Muon(
            matrices,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        adam_groups = [g for g in adam_groups if g["params"]]
        self.adamw = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading replaces the inner optimizers' group dicts: share the new ones again
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]
