"""A tiny random lmforge decoder checkpoint folder for tests (weights, config.yaml with the model
section, tokenizer.json), written the way a run's checkpoint is read back by ``lmforge.load``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from lmforge.config import Section, to_yaml
from lmforge.data.tokenizer import save_tokenizer, train_tokenizer
from lmforge.models.decoder import Decoder, DecoderConfig


class _Model(Section):
    model: Any


def write_tiny_decoder(
    out: Path, text: str, vocab_size: int, context_length: int, seed: int = 0
) -> Path:
    """A 2-layer, 32-wide Llama-style decoder with a BPE tokenizer trained on ``text``; folders
    of different seeds have the same shapes."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([text], vocab_size=vocab_size)
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        arch="llama", vocab_size=tok.get_vocab_size(), context_length=context_length, n_layer=2,
        n_head=2, d_model=32,
    )  # fmt: skip
    save_model(Decoder(cfg), str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(_Model(model=cfg)))
    save_tokenizer(tok, out / "tokenizer.json")
    return out
