"""A self-describing inference checkpoint folder (weights, model config, tokenizer, chat template,
manifest): what a fine-tune writes as ``<run>/model`` and ``lmforge merge`` writes, and the
full-precision base with an adapter folded in that both write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from tokenizers import Tokenizer

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.load import load
from lmforge.checkpoint.manifest import describe, write_manifest
from lmforge.config import Section, to_yaml
from lmforge.data.chat_template import ChatFormat
from lmforge.interop.peft import load_adapter
from lmforge.models.decoder import Decoder
from lmforge.models.lora import merge_lora


class _ModelOnly(Section):
    model: Any


def write_model_folder(model: Decoder, tokenizer: Tokenizer, fmt: ChatFormat, out: Path) -> Path:
    """A self-describing inference checkpoint: weights, model config, tokenizer, chat template."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    atomic_write_text(out / "config.yaml", to_yaml(_ModelOnly(model=model.cfg)))
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    atomic_write_text(out / "chat_template.jinja", fmt.template)
    write_manifest(out, describe(model, tokenizer=True))
    eos = tokenizer.id_to_token(fmt.end_of_turn)
    atomic_write_text(
        out / "tokenizer_config.json", json.dumps({"eos_token": eos}, indent=2) + "\n"
    )
    return out


def merged_model(base: str | Path, adapter: str | Path) -> tuple[Decoder, Tokenizer, ChatFormat]:
    """The full-precision base on the CPU with the adapter folded in, its tokenizer and chat
    format. No check of the adapter's recorded base (``merge`` does it)."""
    model, tokenizer, manifest = load(base, torch.device("cpu"), expect="decoder")
    ckpt = manifest.path
    fmt = ChatFormat.for_checkpoint(ckpt, tokenizer)
    merge_lora(load_adapter(model, adapter))
    return model, tokenizer, fmt
