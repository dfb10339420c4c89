"""Masked-LM metrics run under the precision's autocast (as eval/lm.py) and leave the mode."""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.mlm import masked_lm_metrics
from lmforge.models.encoder import Encoder, EncoderConfig, MaskedLMHead


def test_masked_lm_metrics_run_under_the_training_precision() -> None:
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=50, context_length=16, n_layer=1, n_head=2, d_model=16)
    model = MaskedLMHead(Encoder(cfg)).train()
    x = torch.randint(3, 50, (4, 16))
    y = torch.full_like(x, -100)
    y[:, ::3] = x[:, ::3]
    seen: list[bool] = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.dtype == torch.bfloat16))
    fp32 = masked_lm_metrics(model, [(x, y)], torch.device("cpu"))
    bf16 = masked_lm_metrics(model, [(x, y)], torch.device("cpu"), "bf16-mixed")
    assert seen == [False, True] and model.training
    assert bf16["val_mlm_loss"] == pytest.approx(fp32["val_mlm_loss"], rel=2e-2)
    assert bf16["val_mlm_loss"] != fp32["val_mlm_loss"]  # it did run in bf16
