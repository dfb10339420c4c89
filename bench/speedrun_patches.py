"""Speedrun levers that are not lmforge options: each is patched in, then `lmforge pretrain` runs.

    python bench/speedrun_patches.py PATCH[=VALUE] [...] -- pretrain --out_dir=... [overrides]

VALUE is the patch's one number, where it has one (``softcap=30``, ``adamw_lr_scale=10``).

``bench/speedrun.py`` runs its patched rows through this file, so the lever table stays
reproducible without shipping an option for every lever that did not pay off. A lever that wins
becomes a real option (as QK-norm did) and leaves this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.models import decoder, layers
from lmforge.train import optim


def softcap(cap: float = 15.0) -> None:
    """Logits → cap · tanh(logits / cap) (modded-nanogpt; Gemma 2)."""
    forward = decoder.Decoder.forward

    def capped(self, *args, **kwargs):
        return cap * torch.tanh(forward(self, *args, **kwargs) / cap)

    decoder.Decoder.forward = capped


def zero_proj() -> None:
    """Residual projections (attention and MLP ``proj``) start at zero (modded-nanogpt)."""
    reset = decoder.Decoder.reset_parameters

    def reset_then_zero(self) -> None:
        reset(self)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("blocks") and name.endswith("proj.weight"):
                    p.zero_()

    decoder.Decoder.reset_parameters = reset_then_zero


def relu2() -> None:
    """The GELU MLP's activation becomes relu(x)² (modded-nanogpt). Run with
    ``--model.mlp=gelu --model.d_ff=1024``: two matrices of the SwiGLU's parameter count."""
    init = layers.GeluMLP.__init__

    def init_relu2(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.act = lambda h: F.relu(h).square()

    layers.GeluMLP.__init__ = init_relu2


def adamw_lr_scale(scale: float = 3.0) -> None:
    """Muon's inner AdamW (embeddings, norm gains) at ``scale`` × lr."""
    step = optim.MuonWithAdamW.step

    def scaled_step(self, closure: object = None) -> None:
        groups = self.adamw.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] *= scale
        try:
            step(self, closure)
        finally:
            for g, lr in zip(groups, saved, strict=True):
                g["lr"] = lr

    optim.MuonWithAdamW.step = scaled_step


def value_residual(mix: float = 0.5) -> None:
    """Every layer after the first attends with values (1 - mix) · v + mix · v₁, v₁ the first
    layer's values at the same positions (ResFormer, Zhou et al. 2024; modded-nanogpt's value
    embeddings are a relative)."""
    forward, attend = decoder.Decoder.forward, layers.attend
    first: list[torch.Tensor] = []  # the first block's values of the running forward

    def forward_fresh(self, *args, **kwargs):
        first.clear()
        return forward(self, *args, **kwargs)

    def attend_mixed(q, k, v, *args, **kwargs):
        if not first:
            first.append(v)
        elif first[0].shape == v.shape:
            v = torch.lerp(v, first[0], mix)
        return attend(q, k, v, *args, **kwargs)

    decoder.Decoder.forward = forward_fresh
    layers.attend = attend_mixed


def ns_steps(steps: float = 3) -> None:
    """Muon's Newton-Schulz iteration runs ``steps`` times instead of 5 (each is 3 matmuls)."""
    newton_schulz = optim.newton_schulz

    def fewer(grad: torch.Tensor, dtype: torch.dtype, steps_: int = int(steps)) -> torch.Tensor:
        return newton_schulz(grad, dtype, steps_)

    optim.newton_schulz = fewer


PATCHES = {"softcap": softcap, "zero_proj": zero_proj, "relu2": relu2,
           "adamw_lr_scale": adamw_lr_scale, "value_residual": value_residual,
           "ns_steps": ns_steps}  # fmt: skip


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    patches, command = [a.partition("=") for a in sys.argv[1:split]], sys.argv[split + 1 :]
    unknown = [name for name, _, _ in patches if name not in PATCHES]
    if unknown:
        raise SystemExit(f"unknown patch {unknown}: choose from {', '.join(PATCHES)}")
    for name, _, value in patches:
        try:
            PATCHES[name](*([float(value)] if value else []))
        except (TypeError, ValueError):
            raise SystemExit(f"patch {name}={value}: {PATCHES[name].__doc__}") from None
    from lmforge.cli import main as lmforge_main

    raise SystemExit(lmforge_main(command))


if __name__ == "__main__":
    main()
