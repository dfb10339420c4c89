"""``lmforge compress quantize`` and ``lmforge compress prune``: a smaller checkpoint folder,
with what it saved and what it cost in quality measured on the same data before and after.

    lmforge compress quantize --checkpoint runs/pretrain-… --out_dir q8 --method int8-weight-only
    lmforge compress prune --checkpoint runs/pretrain-… --out_dir p50 --method structured --amount 0.5

The output loads wherever a checkpoint is accepted (``lmforge generate``, ``eval``, ``serve``,
``lmforge.load``); ``compression.json`` in it holds the report the command prints.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lmforge.checkpoint.load import load
from lmforge.compress.folder import check_out_dir, float_bytes, write_compressed, write_report
from lmforge.compress.measure import count_params, default_data, deltas, quality, weights_bytes
from lmforge.compress.quantize import is_quantized, quantize_model
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

KINDS = ("decoder", "sequence-classifier")


class QuantizeConfig(Section):
    checkpoint: str = Field(
        description="checkpoint, run folder (its latest checkpoint), Hugging Face folder or .gguf "
        "file: a decoder or a sequence classifier"
    )
    out_dir: str = Field(description="folder to write the quantized checkpoint to; new or empty")
    method: Literal["int8-dynamic", "int8-weight-only", "int4-weight-only"] = Field(
        "int8-weight-only",
        description="int8-dynamic: int8 weights and per-token int8 activations; int8-weight-only: "
        "int8 weights per output channel; int4-weight-only: int4 weights in groups (group_size)",
    )
    group_size: int = Field(32, description="int4: input channels per scale (32, 64, 128 or 256)")
    data: str | None = Field(
        None,
        description="quality is measured on it before and after: a decoder's UTF-8 text (its "
        "held-out tail, max_eval_bytes), a classifier's labelled file; null = the shipped "
        "TinyShakespeare / support-ticket test set",
    )
    max_eval_bytes: int = Field(
        100_000, gt=0, description="decoders: bytes at the end of data that are scored"
    )
    num_threads: int | None = Field(None, gt=0, description="CPU threads; null = torch's default")


def _load_source(checkpoint: str, num_threads: int | None) -> Any:
    if num_threads:
        torch.set_num_threads(num_threads)
    loaded = load(checkpoint, torch.device("cpu"), expect=KINDS)
    if is_quantized(loaded.model) or loaded.manifest.quantization:
        raise CheckpointError(
            f"{loaded.manifest.path} is already quantized ({loaded.manifest.quantization}); "
            "compress its float source instead"
        )
    return loaded


def quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Load, measure, quantize, measure again, write; returns the report (compression.json)."""
    out = Path(cfg.out_dir)
    check_out_dir(out)
    if cfg.method == "int4-weight-only" and cfg.group_size not in (32, 64, 128, 256):
        raise ConfigError(f"group_size: {cfg.group_size} is not one of 32, 64, 128, 256")
    model, tokenizer, manifest = _load_source(cfg.checkpoint, cfg.num_threads)
    data = cfg.data or default_data(manifest)
    t0 = time.perf_counter()
    before = quality(model, tokenizer, manifest, data, cfg.max_eval_bytes)
    size_before = float_bytes(model)
    names = quantize_model(model, cfg.method, cfg.group_size)
    after = quality(model, tokenizer, manifest, data, cfg.max_eval_bytes)
    report: dict[str, Any] = {
        "step": "quantize",
        "method": cfg.method,
        "group_size": cfg.group_size if cfg.method == "int4-weight-only" else None,
        "library": _torchao_version(),
        "source": str(manifest.path),
        "quantized_layers": len(names),
        "kept_float": "embeddings, norms, tied output head, layers whose width is not a "
        "multiple of group_size (int4)",
        "data": data,
        "quality": deltas(before, after),
        "bytes_before": size_before,
        "parameters": count_params(model),
        "seconds": 0.0,
    }
    write_compressed(model, tokenizer, manifest, out, quantization=cfg.method)
    report["bytes_after"] = weights_bytes(out)
    report["seconds"] = time.perf_counter() - t0
    write_report(out, report)
    return {"out_dir": str(out), **report}


def _torchao_version() -> str:
    from importlib.metadata import version

    return f"torchao {version('torchao')}"
