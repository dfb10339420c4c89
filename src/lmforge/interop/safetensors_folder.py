"""A Hugging Face model folder's weights: ``model.safetensors``, or shards listed in
``model.safetensors.index.json``. Every family (decoder, BERT, and later T5/BART/ViT) reads its
folder here; pickle files (``*.bin``) are never loaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmforge.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from lmforge.errors import CheckpointError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``, in index order; CheckpointError names what is missing."""
    single, index = folder / SINGLE, folder / INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(f"{folder}: shards listed in {index.name} are missing: {missing}")
        return files
    pickled = [p.name for p in folder.glob("*.bin")]
    hint = f"; found {pickled}, but pickle files are never loaded" if pickled else ""
    raise CheckpointError(f"{folder}: {SINGLE} (or its .index.json) is missing{hint}")


def read_tensors(
    files: list[Path], prefix: str = "", keep: tuple[str, ...] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file, one tensor in memory at a time.

    ``prefix`` is added to names that lack it and do not start with one of ``keep`` (the hub's
    original gpt2 files have no ``transformer.`` but their ``lm_head`` is top-level)."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                full = name if not prefix or name.startswith((prefix, *keep)) else prefix + name
                yield full, f.get_tensor(name)


def write_hf_folder(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    tokenizer: Tokenizer | None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``, + ``extra_files``: name →
    text or bytes, e.g. ``tokenizer_config.json``) written to a staging folder and renamed to
    ``out_dir`` (which must not exist or be empty: an export never overwrites files) only when
    complete; the one writer of every family's Hugging Face export."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new --out_dir")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-export
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        atomic_write_text(tmp / "tokenizer.json", tokenizer.to_str(pretty=True))
    for name, content in (extra_files or {}).items():
        if isinstance(content, bytes):
            atomic_write_bytes(tmp / name, content)
        else:
            atomic_write_text(tmp / name, content)
    fsync_dir(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    fsync_dir(out.parent)
    return out
