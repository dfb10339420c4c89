"""Per-layer training statistics for the training doctor (``train.log_layer_stats=true``).

At every logged step ``fit`` records, for each layer (embedding, each block, the final norm and
head): the gradient norm after clipping, the size of the optimizer's update relative to the
weights (‖Δw‖ / ‖w‖; about 1e-3 is the usual healthy scale for Adam, Karpathy's rule of thumb),
and for each block's MLP the fraction of hidden units that were dead on the whole batch
(pre-activation below ``DEAD_BELOW`` for every token: GELU/SiLU give ~0 output and ~0 gradient
there). ``lmforge doctor`` reads them from metrics.jsonl (``diagnose/doctor.py``).

Costs one copy of the trainable weights at logged steps only, and nothing at the others.
"""

from __future__ import annotations

import torch
from torch import nn

DEAD_BELOW = -3.0  # GELU(-3) ≈ -0.004 and SiLU(-3) ≈ -0.14 with gradients ≈ -0.01 and -0.09


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``blocks.3.attn.qkv.weight`` → ``blocks.3``."""
    parts = name.removeprefix("module.").removeprefix("_orig_mod.").split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


class LayerStats:
    """Collects one step's statistics: ``begin()`` before the step (when it will be logged),
    ``on_gradients()`` after clipping and before the optimizer update, ``end()`` after it."""

    def __init__(self, model: nn.Module) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.mlp_inputs = [
            (name.removeprefix("module."), module)
            for name, module in model.named_modules()
            if name.endswith(("mlp.fc", "mlp.gate"))
        ]
        self._before: dict[str, torch.Tensor] | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.stats: dict[str, dict[str, float]] = {}

    def begin(self) -> None:
        self.stats = {}
        self._before = {n: p.detach().clone() for n, p in self.named}
        for name, module in self.mlp_inputs:
            layer = layer_of(name)
            self._hooks.append(module.register_forward_hook(self._dead_units_hook(layer)))

    def _dead_units_hook(self, layer: str):  # noqa: ANN202 — a forward hook
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            alive = (out.detach() > DEAD_BELOW).flatten(0, -2).any(dim=0)  # (hidden,)
            entry = self.stats.setdefault(layer, {})
            # several micro-batches: a unit is dead only if it was dead in every one
            dead = 1.0 - alive.float().mean().item()
            entry["dead_frac"] = min(entry.get("dead_frac", 1.0), dead)

        return hook

    def on_gradients(self) -> None:
        if self._before is None:  # not a logged step
            return
        sums: dict[str, float] = {}
        for name, p in self.named:
            if p.grad is not None:
                layer = layer_of(name)
                sums[layer] = sums.get(layer, 0.0) + float(p.grad.detach().float().square().sum())
        for layer, s in sums.items():
            self.stats.setdefault(layer, {})["grad_norm"] = s**0.5

    def end(self) -> dict[str, dict[str, float]]:
        """This step's statistics by layer; removes the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._before is not None:
            delta: dict[str, float] = {}
            norm: dict[str, float] = {}
            for name, p in self.named:
                layer = layer_of(name)
                before = self._before[name].float()
                delta[layer] = delta.get(layer, 0.0) + float(
                    (p.detach().float() - before).square().sum()
                )
                norm[layer] = norm.get(layer, 0.0) + float(before.square().sum())
            for layer in delta:
                ratio = (delta[layer] / norm[layer]) ** 0.5 if norm[layer] > 0 else 0.0
                self.stats.setdefault(layer, {})["update_ratio"] = ratio
            self._before = None
        return self.stats
