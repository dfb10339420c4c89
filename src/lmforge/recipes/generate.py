"""``lmforge generate``: stream a sample from a checkpoint to the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pydantic import Field

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.load import load
from lmforge.data.chat_template import ChatFormat
from lmforge.data.tokenizer import special_tokens
from lmforge.generate import SampleConfig, generate_text
from lmforge.train.device import resolve_device


class GenerateConfig(SampleConfig):
    max_new_tokens: int = Field(
        SampleConfig.model_fields["max_new_tokens"].default,
        gt=0,
        description="tokens to generate at most (fewer if the model ends the text). No upper "
        "limit: past the model's context_length each new token sees the last context_length "
        "tokens (a sliding window, re-read every step, so slower), and Ctrl-C stops it with the "
        "text so far printed; a server must cap it",
    )
    checkpoint: str = Field(
        description="checkpoint folder, or a run folder (its latest checkpoint)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    out_dir: str | None = Field(
        None,
        description="also write generation.json (settings, prompt, text) here; null = print only",
    )


def generate(cfg: GenerateConfig) -> str:
    device = resolve_device(cfg.device)
    model, tokenizer, manifest = load(cfg.checkpoint, device, expect="decoder")
    ckpt = manifest.path
    # A chat model ends its answer with an end-of-turn token (<|im_end|>, <|eot_id|>), not the
    # end-of-text one: stop at any of them, as transformers does with generation_config.json.
    stop = ChatFormat.for_checkpoint(ckpt, tokenizer).stop_ids(ckpt if ckpt.is_dir() else None)
    sys.stdout.write(cfg.prompt)
    sys.stdout.flush()

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with torch.inference_mode():
        text = generate_text(
            model,
            tokenizer,
            cfg.prompt,
            cfg,
            bos_id=special_tokens(tokenizer).bos,  # only an empty prompt needs one
            eos_id=stop,
            on_text=show,
        )
    sys.stdout.write("\n")
    if cfg.out_dir:
        record = {**cfg.model_dump(mode="json"), "resolved_checkpoint": str(ckpt), "text": text}
        atomic_write_text(
            Path(cfg.out_dir) / "generation.json", json.dumps(record, indent=2) + "\n"
        )
    return text
