"""``lmforge export``: write a checkpoint in another framework's format.

    lmforge export --checkpoint runs/pretrain-…/ --format hf --out_dir my-model/

``hf`` writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline (``interop/hf.py``). ONNX comes later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from lmforge.checkpoint.load import load
from lmforge.config import Section
from lmforge.interop.hf import export_hf


class ExportConfig(Section):
    checkpoint: str = Field(
        description="checkpoint folder, run folder (its latest checkpoint), "
        "Hugging Face model folder or .gguf file"
    )
    format: Literal["hf"] = Field(
        "hf", description="hf: a Hugging Face transformers folder (config.json, model.safetensors)"
    )
    out_dir: str = Field(description="folder to write; must not exist yet (or be empty)")


def export(cfg: ExportConfig) -> Path:
    """Load ``cfg.checkpoint`` on the CPU and write it to ``cfg.out_dir``; returns that folder."""
    model, tokenizer, manifest = load(
        cfg.checkpoint, torch.device("cpu"), expect=("decoder", "image-classifier")
    )
    if manifest.kind == "image-classifier":  # ViTForImageClassification (interop/hf_vit.py)
        from lmforge.interop.hf_vit import export_hf_vit

        return export_hf_vit(model, cfg.out_dir)
    return export_hf(model, tokenizer, cfg.out_dir)
