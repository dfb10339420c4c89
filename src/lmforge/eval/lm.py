"""Language-model metrics: loss, perplexity and bits-per-byte over a whole token stream.

Bits-per-byte divides the summed loss (nats) by ln 2 and by the UTF-8 bytes of the evaluated
text, so models with different tokenizers (character-level, BPE of any size) compare.
Training-time evaluation and ``lmforge eval`` both use these functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lmforge.data.loader import iter_eval_windows
from lmforge.models.decoder import token_loss_sum
from lmforge.train.precision import autocast


@torch.no_grad()
def stream_loss_sum(
    model: nn.Module,
    tokens: np.ndarray,
    context: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, int]:
    """Summed next-token loss (nats) and predicted-token count over the whole ``tokens`` stream.

    The stream is walked in consecutive windows (``data.loader.iter_eval_windows``); every token
    but the first is predicted exactly once, the first target of each window from one token of
    context, later ones from up to ``context`` tokens.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in iter_eval_windows(tokens, context, batch_size):
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                logits = model(x)
            loss, n = token_loss_sum(logits, y)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    return total, count


def lm_metrics(loss_sum: float, n_tokens: int, n_bytes: int | None) -> dict[str, float]:
    """``val_loss`` (nats/token), ``val_ppl`` and, when the byte count is known, ``val_bpb``."""
    loss = loss_sum / max(1, n_tokens)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
    if n_bytes:
        out["val_bpb"] = loss_sum / math.log(2) / n_bytes
    return out
