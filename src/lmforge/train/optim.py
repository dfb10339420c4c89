"""Optimizers by name, with the parameter groups every recipe shares.

Weight decay applies only to matrices that multiply activations. Norm gains, biases and
embeddings are left alone: decaying them pulls scales and lookup rows towards zero without
regularising anything (nanoGPT, minGPT and most published recipes do the same).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lmforge.config import Section
from lmforge.errors import ConfigError
from lmforge.models.layers import CausalSelfAttention
from lmforge.train.precision import auto_precision

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
    """Muon for the matrices inside the blocks, AdamW for everything else.

    Muon orthogonalises each matrix's momentum (Newton-Schulz) before the update; it is meant
    for hidden 2-D weights only — embeddings, the output head, norm gains and biases keep AdamW
    (Jordan et al. 2024; Moonshot, "Muon is scalable for LLM training", 2025). The step is
    rescaled to AdamW's update size (0.2·sqrt(max(rows, cols)), torch's ``match_rms_adamw``),
    so one ``optim.lr`` and one weight decay serve both.

    The Muon step is written here rather than taken from ``torch.optim.Muon`` (same update,
    same coefficients): torch's runs Newton-Schulz in bfloat16 always, which CPUs without native
    bf16 emulate ~50x slower than fp32 (measured: 367 vs ~1,900 tokens/s for the CPU demo on
    an AVX2 host). Here it runs in bf16 only where ``auto_precision`` finds bf16 fast.
    One optimizer object for the loop: group 0 is Muon's, the rest are the inner AdamW's (the
    same dicts, so the LR schedule reaches both); the state dict holds both for exact resume.

    The fused q/k/v projection is orthogonalised as the three matrices it holds, each with its
    own rescaling: the step ``torch.optim.Muon`` takes on separate q, k and v Linears (and
    what the reference implementations do). Treating the fused matrix as one gave 2.0817
    against 2.0709 val bits-per-byte on the CPU demo (docs/speedrun.md).
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
        if any(type(p).__name__ == "DTensor" for p in matrices):
            raise ConfigError(
                "optim.name=muon orthogonalises whole matrices; under dist.strategy=fsdp or tp "
                "each rank holds a shard: use dist.strategy=none or ddp, or optim.name=adamw"
            )
        adam_groups = [g for g in adam_groups if g["params"]]
        self.adamw = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        muon = {"params": matrices, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        super().__init__([muon, *self.adamw.param_groups], {"momentum": cfg.muon_momentum})
        device = matrices[0].device if matrices else torch.device("cpu")
        self.ns_dtype = torch.bfloat16 if auto_precision(device) == "bf16-mixed" else torch.float32
        self.row_blocks = {  # id(fused qkv weight) -> rows of q, k, v
            id(m.qkv.weight): (m.n_head * m.head_dim, *[m.n_kv_head * m.head_dim] * 2)
            for m in model.modules()
            if isinstance(m, CausalSelfAttention) and isinstance(m.qkv, nn.Linear)
        }

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            grad = p.grad.lerp(buf, momentum)  # Nesterov
            p.mul_(1 - lr * group["weight_decay"])
            start = 0
            for rows in self.row_blocks.get(id(p), (p.size(0),)):
                update = newton_schulz(grad[start : start + rows], self.ns_dtype)
                scale = 0.2 * lr * math.sqrt(max(rows, p.size(1)))
                p[start : start + rows].add_(update.to(p.dtype), alpha=-scale)
                start += rows
        self.adamw.step()

    def state_dict(self) -> dict:  # type: ignore[override]
        params = self.param_groups[0]["params"]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        return {"muon": buffers, "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        for p, buf in zip(self.param_groups[0]["params"], state_dict["muon"], strict=True):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype)
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading replaces the inner optimizer's group dicts: share the new ones again
        self.param_groups[1:] = self.adamw.param_groups


def newton_schulz(grad: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: ≈ the orthogonal factor U·Vᵀ of ``grad``'s SVD
    (Keller Jordan's coefficients, as in ``torch.optim.Muon``)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x
