"""``lmforge merge --base BASE --adapter DIR --out_dir OUT``: fold a LoRA/DoRA adapter into the
base it was trained on and write a self-describing checkpoint folder.

The adapter records its base (``base_model_name_or_path`` in ``adapter_config.json``); an
adapter of the right shapes merged onto another base gives a model that runs and is wrong, so
a different base is refused unless ``--allow_base_mismatch=true``. ``--out_dir`` must not exist
or be empty, as for ``lmforge export``: a merge never overwrites files.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lmforge.checkpoint.model_folder import merged_model, write_model_folder
from lmforge.checkpoint.store import find_checkpoint
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.peft import ADAPTER_CONFIG, read_adapter_config


class MergeConfig(Section):
    base: str = Field(description="the base checkpoint the adapter was trained on")
    adapter: str = Field(
        description="adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    out_dir: str = Field(description="folder to write the merged checkpoint to; new or empty")
    allow_base_mismatch: bool = Field(
        False,
        description="merge even if --base is not the adapter's base_model_name_or_path",
    )


def _same_base(recorded: str, base: Path) -> bool:
    """Does the adapter's recorded base name the checkpoint ``base`` (already resolved)?

    A recorded path is compared after resolving it as ``--base`` is (a run folder → its latest
    checkpoint). A recorded hub id (``org/name``, not a path here) matches a local folder of
    the same last name, the usual layout of a downloaded model."""
    try:
        return find_checkpoint(recorded).resolve() == base.resolve()
    except (CheckpointError, ConfigError):  # not a checkpoint on this machine: compare names
        return Path(recorded).name == base.name and not Path(recorded).exists()


def check_adapter_base(adapter_dir: str | Path, base: Path) -> None:
    """CheckpointError unless the adapter says it was trained on ``base`` (or records none)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path") or ""
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: base_model_name_or_path must be a string")
    if recorded and not _same_base(recorded, base):
        raise CheckpointError(
            f"{path}: the adapter was trained on base_model_name_or_path={recorded!r}, not on "
            f"{str(base)!r}; merge onto that base, or pass --allow_base_mismatch=true if "
            "they hold the same weights"
        )


def merge(cfg: MergeConfig) -> Path:
    """Check the output folder and the adapter's base, merge, write the checkpoint folder."""
    out = Path(cfg.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new --out_dir")
    read_adapter_config(cfg.adapter)  # a broken adapter fails before the base is loaded
    if not cfg.allow_base_mismatch:
        check_adapter_base(cfg.adapter, find_checkpoint(cfg.base))
    return write_model_folder(*merged_model(cfg.base, cfg.adapter), out)
