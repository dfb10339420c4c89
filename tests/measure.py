"""Test helpers for memory measurements: the live-tensor peak of a steady-state training step,
and a LoRA Decoder switched back to the eager blocks peft would run (the comparison for
lmforge's lean LoRA blocks)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.plan.tracker import track_peak
from lmforge.train.loop import accumulate_gradients
from lmforge.train.optim import OptimConfig, build_optimizer


def second_step_peak(model: nn.Module, batch: int, seq: int, precision: str = "fp32") -> dict:
    """Peak live bytes by category (``peak["Total"]``) of the second of two AdamW steps on
    random tokens (the first creates the optimizer states)."""
    opt = build_optimizer(model, OptimConfig())
    vocab = model.cfg.vocab_size

    def step() -> None:
        xy = (torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq)))
        accumulate_gradients(model, [xy], precision, torch.device("cpu"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with track_peak(model, opt) as peak:
        step()
    return peak


def eager_lora_blocks(model: nn.Module) -> nn.Module:
    """The same LoRA model keeping its norm outputs and the SwiGLU product for backward."""
    model.rebuild_norm_outputs = False
    for m in model.modules():  # the down adapters take the eager SwiGLU path
        if hasattr(m, "gated_forward"):
            m.gated_forward = None
    return model
