"""``lmforge data prepare``: raw text → cleaned, deduplicated, tokenized train/val shards."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from lmforge import runs
from lmforge.config import Section
from lmforge.data.prepare import DataConfig, prepare_data


class PrepareConfig(Section):
    data: DataConfig = DataConfig()
    out_dir: str | None = Field(None, description="output folder; null = runs/data-<date>-<time>")
    seed: int = Field(1337, description="seed of the document split and near-dedup hashing")


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    run = runs.start("data", cfg.out_dir)
    with runs.failure_note(run):
        runs.write_config(run, cfg)
        meta = prepare_data(cfg.data, run.dir, cfg.seed)
    return {"dir": str(meta.get("data_dir", run.dir)), **meta}
