"""``write_hf_folder``: the one staged writer of Hugging Face export folders (decoder, BERT,
T5/BART, ViT) — complete or absent, never overwriting, extra files included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.interop.safetensors_folder import weight_files, write_hf_folder


def test_writes_weights_config_and_extra_files(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    extra = {"tokenizer_config.json": '{"x": 1}\n', "blob.bin": b"\x00\xffraw"}
    out = write_hf_folder(tmp_path / "out", tensors, {"model_type": "bert"}, None, extra)
    assert sorted(p.name for p in out.iterdir()) == [
        "blob.bin",
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    loaded = load_file(str(weight_files(out)[0]))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert json.loads((out / "config.json").read_text()) == {"model_type": "bert"}
    assert (out / "tokenizer_config.json").read_text() == '{"x": 1}\n'
    assert (out / "blob.bin").read_bytes() == b"\x00\xffraw"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_an_empty_folder_is_filled_a_used_one_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_hf_folder(tmp_path / "empty", {"w": torch.zeros(1)}, {}, None)
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_hf_folder(used, {"w": torch.zeros(1)}, {}, None, {"extra.json": "{}"})
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
