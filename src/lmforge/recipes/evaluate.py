"""``lmforge eval``: loss, perplexity and bits-per-byte of a checkpoint on held-out data.

``--data`` may be a prepared data folder (its ``val.bin``, or ``--split``), a ``.bin`` token
file inside such a folder, or a plain text file (tokenized with the checkpoint's tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.load import load
from lmforge.config import Section, package_path
from lmforge.data.prepare import load_meta
from lmforge.data.shards import open_shard
from lmforge.errors import ConfigError
from lmforge.eval.lm import check_shard_tokenizer, lm_metrics, stream_loss_sum
from lmforge.train.device import resolve_device
from lmforge.train.precision import precision_error


class EvalConfig(Section):
    checkpoint: str = Field(
        description="checkpoint folder, or a run folder (its latest checkpoint)"
    )
    data: str | None = Field(
        None,
        description="prepared data folder, a .bin token file, or a UTF-8 text file (pkg:lmforge/"
        "data/corpora/chinese_classical.txt names a shipped one); for an image classifier a "
        "folder of class folders or an .npz (null: its run's test split)",
    )
    max_bytes: int | None = Field(
        None, gt=0, description="text files: score only the last max_bytes bytes (from a line "
        "start), as lmforge compress does; null = the whole file",
    )  # fmt: skip
    split: Literal["train", "val"] = Field("val", description="split of a prepared data folder")
    batch_size: int = Field(8, gt=0, description="sequences per batch")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = Field(
        "fp32", description="numeric precision"
    )
    out_dir: str | None = Field(None, description="write report.json here; null = print only")


def _tokens_and_bytes(cfg: EvalConfig, tokenizer, ckpt: str) -> tuple[np.ndarray, int]:
    path = package_path(cfg.data)
    if cfg.max_bytes and (path.is_dir() or path.suffix == ".bin"):
        raise ConfigError(f"max_bytes: applies to a text file; {path} is prepared token data")
    if path.is_dir():
        meta = load_meta(path)
        check_shard_tokenizer(path, tokenizer, ckpt)
        return open_shard(path, cfg.split), meta[f"{cfg.split}_bytes"]
    if path.suffix == ".bin":
        split = path.stem
        meta = load_meta(path.parent)
        if f"{split}_bytes" not in meta:
            raise ConfigError(f"data: {path} is not a train.bin/val.bin of a prepared data folder")
        check_shard_tokenizer(path.parent, tokenizer, ckpt)
        return open_shard(path.parent, split), meta[f"{split}_bytes"]
    if not path.is_file():
        raise ConfigError(f"data: {path}: no such file or folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"data: {path}: not UTF-8 text (byte {e.start}); pass a prepared data folder"
        ) from None
    if cfg.max_bytes:
        from lmforge.compress.measure import held_out

        text = held_out(text, cfg.max_bytes)
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    return ids, len(text.encode("utf-8"))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    if err := precision_error(cfg.precision, device):
        raise ConfigError(err)
    # Task dispatch: classifier checkpoints → classification metrics; a prompt/reference
    # .jsonl → generation metrics; otherwise (below) perplexity and bits-per-byte.
    from lmforge.eval.classification import evaluate_classifier, evaluate_image_classifier
    from lmforge.eval.generation import evaluate_generation, is_prompt_file

    kinds = ("decoder", "sequence-classifier", "image-classifier")
    loaded = load(cfg.checkpoint, device, expect=kinds)
    if loaded.manifest.kind == "image-classifier":
        return evaluate_image_classifier(loaded, cfg.data, cfg.batch_size, device, cfg.out_dir)
    if cfg.data is None:
        raise ConfigError(f"data: {cfg.checkpoint} is a {loaded.manifest.kind}; give --data")
    if loaded.manifest.kind == "sequence-classifier":
        return evaluate_classifier(loaded, cfg.data, cfg.batch_size, device, cfg.out_dir)
    model, tokenizer, manifest = loaded
    ckpt = manifest.path
    if is_prompt_file(cfg.data):
        out = Path(cfg.out_dir) if cfg.out_dir else Path("eval")
        info = {"checkpoint": str(ckpt), "data": cfg.data}
        return {**info, "report": str(out / "report.md"),
                **evaluate_generation(model, tokenizer, cfg.data, out, info=info,
                                     batch_size=cfg.batch_size)}  # fmt: skip
    tokens, n_bytes = _tokens_and_bytes(cfg, tokenizer, str(ckpt))
    if len(tokens) < 2:
        raise ConfigError(f"data: {cfg.data} holds {len(tokens)} tokens; at least 2 are needed")
    loss_sum, n = stream_loss_sum(
        model, tokens, model.cfg.context_length, cfg.batch_size, device, cfg.precision
    )
    report = {
        "checkpoint": str(ckpt),
        "data": cfg.data,
        "tokens": n,
        "bytes": n_bytes,
        **lm_metrics(loss_sum, n, n_bytes),
    }
    if cfg.out_dir:
        atomic_write_text(Path(cfg.out_dir) / "report.json", json.dumps(report, indent=2) + "\n")
    return report
