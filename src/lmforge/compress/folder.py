"""The checkpoint folder a compression step writes: what ``lmforge.load`` reads, plus a report.

model.safetensors   float weights, or quantized ones (``checkpoint/quantized.py``)
config.yaml         the source's config with the (possibly pruned) model section
tokenizer.json      the source's tokenizer
chat_template.jinja, tokenizer_config.json   decoders: the chat template and end-of-turn
manifest.json       kind, family and, when quantized, the method
compression.json    what was done, what it saved and what it cost in quality
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from tokenizers import Tokenizer
from torch import nn

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.manifest import Manifest, describe, write_manifest
from lmforge.checkpoint.quantized import save_quantized
from lmforge.config import read_yaml
from lmforge.errors import ConfigError


def check_out_dir(out: Path) -> None:
    """``out`` must be new or an empty folder: a compression step never overwrites files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out_dir: {out} exists and is not empty; choose a new --out_dir")


def float_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s float weights as ``model.safetensors`` holds them (tied once)."""
    seen: set[int] = set()
    n = 0
    for t in model.state_dict().values():
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.numel() * t.element_size()
    return n


def _config(model: nn.Module, source: Manifest) -> dict[str, Any]:
    """The source's config.yaml (a classifier's data columns and head) with the model's own
    (possibly pruned) model section; a Hugging Face or GGUF decoder: the model section."""
    cfg: dict[str, Any] = {}
    src = Path(source.path or ".")
    if source.source == "lmforge" and (src / "config.yaml").is_file():
        cfg = read_yaml(src / "config.yaml")
    inner = getattr(model, "encoder", model)
    cfg["model"] = inner.cfg.model_dump(mode="json")
    return cfg


def write_compressed(
    model: nn.Module,
    tokenizer: Tokenizer,
    source: Manifest,
    out: Path,
    quantization: str | None = None,
) -> Path:
    """Write ``model`` (on the CPU) as a self-describing checkpoint folder ``out`` (the
    report follows with ``write_report``, once the written size is known)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    if quantization:
        save_quantized(model, out / "model.safetensors")
    else:
        save_model(model, str(out / "model.safetensors"))
    text = yaml.safe_dump(_config(model, source), sort_keys=False, allow_unicode=True)
    atomic_write_text(out / "config.yaml", text)
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    if source.kind == "decoder":
        from lmforge.data.chat_template import ChatFormat

        fmt = ChatFormat.for_checkpoint(Path(source.path or "."), tokenizer)
        atomic_write_text(out / "chat_template.jinja", fmt.template)
        eos = tokenizer.id_to_token(fmt.end_of_turn)
        atomic_write_text(
            out / "tokenizer_config.json", json.dumps({"eos_token": eos}, indent=2) + "\n"
        )
    manifest = describe(model, tokenizer=True).model_copy(update={"quantization": quantization})
    write_manifest(out, manifest)
    return out


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``compression.json``: what was done, what it saved, what it cost in quality."""
    atomic_write_text(out / "compression.json", json.dumps(report, indent=2) + "\n")
