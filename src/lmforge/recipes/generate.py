"""``lmforge generate``: stream a sample from a checkpoint to the terminal."""

from __future__ import annotations

import sys

import torch
from pydantic import Field

from lmforge.data.tokenizer import bos_id, eos_id
from lmforge.generate import SampleConfig, generate_text
from lmforge.train.checkpoint import load_for_inference
from lmforge.train.device import resolve_device


class GenerateConfig(SampleConfig):
    checkpoint: str = Field(
        description="checkpoint folder, or a run folder (its latest checkpoint)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")


def generate(cfg: GenerateConfig) -> str:
    device = resolve_device(cfg.device)
    model, tokenizer, _ = load_for_inference(cfg.checkpoint, device)
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
            bos_id=bos_id(tokenizer),
            eos_id=eos_id(tokenizer),
            on_text=show,
        )
    sys.stdout.write("\n")
    return text
