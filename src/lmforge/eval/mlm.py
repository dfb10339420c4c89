"""Masked-language-model metrics: cross-entropy and accuracy on the masked positions.

Run under the same autocast as ``eval/lm.py`` (``precision``), so the numbers a bf16 run logs
while training are the numbers the trained model gets.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.eval.mode import eval_mode
from lmforge.models.decoder import token_loss_sum
from lmforge.train.precision import autocast


def masked_lm_metrics(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean cross-entropy (nats) and accuracy over the masked positions of fixed batches.

    batches: (inputs (B, T) with masks applied, labels (B, T): the original id at masked
    positions, -100 elsewhere), e.g. from ``recipes.mlm.mask_tokens`` drawn once."""
    loss, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                logits = model(x)  # (B, T, V)
            loss_sum, n = token_loss_sum(logits, y)
            loss += float(loss_sum)
            count += n
            correct += int(((logits.argmax(-1) == y) & (y != -100)).sum())
    return {"val_mlm_loss": loss / max(1, count), "val_mlm_accuracy": correct / max(1, count)}
