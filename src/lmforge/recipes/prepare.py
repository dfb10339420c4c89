"""``lmforge data prepare``: raw text → cleaned, deduplicated, tokenized train/val shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.config import Section, save_config
from lmforge.data.prepare import DataConfig, prepare_data


class PrepareConfig(Section):
    data: DataConfig = DataConfig()
    out_dir: str | None = Field(None, description="output folder; null = runs/data-<date>-<time>")
    seed: int = Field(1337, description="seed of the document split and near-dedup hashing")


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir or f"runs/data-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    meta = prepare_data(cfg.data, out_dir, cfg.seed)
    return {"dir": str(meta.get("data_dir", out_dir)), **meta}
