"""DataConfig validation and prepare_data end to end: meta.json, shards, reuse."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.config import validate_config
from lmforge.data.prepare import (
    DataConfig,
    default_corpus_path,
    is_prepared,
    load_meta,
    prepare_data,
)
from lmforge.data.shards import open_shard
from lmforge.data.tokenizer import load_tokenizer, tokenizer_sha256
from lmforge.errors import ConfigError, DataError

from .conftest import SAMPLES, make_words

META_KEYS = {
    "format", "dtype", "vocab_size", "special_tokens", "tokenizer_file", "tokenizer_sha256",
    "split_method", "val_fraction", "seed", "source", "cleaning", "data_config", "seconds",
    "lmforge_version",
    *(f"{split}_{what}" for split in ("train", "val")
      for what in ("file", "tokens", "documents", "bytes", "chars")),
}  # fmt: skip


def test_config_defaults_and_help_text():
    cfg = DataConfig()
    assert cfg.path is None and cfg.vocab_size == 2048 and cfg.num_workers == 2
    assert all(field.description for field in DataConfig.model_fields.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vocab_size": 100}, "vocab_size: Input should be greater than or equal to 259"),
        ({"val_fraction": 0}, "val_fraction: Input should be greater than 0"),
        ({"val_fraction": 0.6}, "val_fraction: Input should be less than or equal to 0.5"),
        (
            {"near_dedup_threshold": 1.5},
            "near_dedup_threshold: Input should be less than or equal to 1",
        ),
        ({"num_workers": 0}, "num_workers: Input should be greater than or equal to 1"),
        ({"on_error": "ignore"}, "on_error: Input should be 'fail' or 'skip'"),
        (
            {"min_chars": 10, "max_chars": 5},
            "max_chars: is below min_chars (10): every document would be dropped (got 5)",
        ),
        ({"vocab": 10}, "vocab: unknown key; did you mean 'vocab_size'?"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(DataConfig, override, "test.yaml")
    assert message in str(err.value)


def write_corpus(folder) -> list[str]:
    """A jsonl corpus of 40 documents plus an exact duplicate, a near duplicate and a bad record."""
    docs = (
        [make_words(60 + i, i) for i in range(30)]
        + SAMPLES[:7]
        + ["中文 " * 30, "short", "x" * 500]
    )
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    lines += [lines[3], json.dumps({"text": docs[5] + " extra"}), "{broken"]
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(lines[20:]) + "\n", encoding="utf-8")
    return docs


def split_docs(shard: np.ndarray, tok, eos: int) -> list[str]:
    ends = np.flatnonzero(shard == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(shard[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def test_prepare_end_to_end(tmp_path, caplog):
    write_corpus(tmp_path / "corpus")
    cfg = DataConfig(path=str(tmp_path / "corpus"), vocab_size=300, on_error="skip", num_workers=1)
    out = tmp_path / "prepared"
    with caplog.at_level(logging.INFO, logger="lmforge.data"):
        meta = prepare_data(cfg, out, seed=0)
    assert [r.message.split(":")[0].split(" ")[0] for r in caplog.records] == [
        "clean",
        "split",
        "tokenizer",
        "tokenize",
    ]

    assert meta.pop("data_dir") == str(out)
    assert json.loads((out / "meta.json").read_text()) == meta == load_meta(out)
    assert set(meta) == META_KEYS
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert meta["special_tokens"] == {"bos": 0, "eos": 1, "pad": 2}
    assert meta["tokenizer_sha256"] == tokenizer_sha256(out / "tokenizer.json")
    assert meta["split_method"] == "by_document" and meta["data_config"] == cfg.model_dump(
        mode="json"
    )
    c = meta["cleaning"]
    assert (c["files"], c["documents_read"], c["skipped"]) == (2, 42, {"invalid_json": 1})
    assert (c["exact_duplicates"], c["near_duplicates"], c["kept"]) == (1, 1, 40)
    assert meta["train_documents"] + meta["val_documents"] == 40 and meta["val_documents"] == 4

    # The shards decode back to the cleaned documents, and no document is on both sides.
    tok = load_tokenizer(out / "tokenizer.json")
    decoded = {}
    for split in ("train", "val"):
        shard = open_shard(out, split)
        assert len(shard) == meta[f"{split}_tokens"] and shard.dtype == np.uint16
        decoded[split] = split_docs(np.asarray(shard), tok, eos=1)
        assert len(decoded[split]) == meta[f"{split}_documents"]
        assert sum(len(d.encode()) for d in decoded[split]) == meta[f"{split}_bytes"]
        assert sum(map(len, decoded[split])) == meta[f"{split}_chars"]
    assert not set(decoded["train"]) & set(decoded["val"])


def test_prepared_folder_is_used_as_is_and_tokenizer_reuse(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = DataConfig(path=str(tmp_path / "corpus"), vocab_size=300, on_error="skip", num_workers=1)
    first = prepare_data(cfg, tmp_path / "one")
    assert is_prepared(tmp_path / "one") and not is_prepared(tmp_path / "corpus")
    stamp = (tmp_path / "one" / "train.bin").stat().st_mtime_ns
    again = prepare_data(DataConfig(path=str(tmp_path / "one")), tmp_path / "unused")
    assert again == first and again["data_dir"] == str(tmp_path / "one")
    assert (tmp_path / "one" / "train.bin").stat().st_mtime_ns == stamp
    assert not (tmp_path / "unused").exists()

    reuse = cfg.model_copy(
        update={"tokenizer": str(tmp_path / "one" / "tokenizer.json"), "vocab_size": 999}
    )
    second = prepare_data(reuse, tmp_path / "two")
    assert second["tokenizer_sha256"] == first["tokenizer_sha256"] and second["vocab_size"] == 300
    assert (tmp_path / "two" / "train.bin").read_bytes() == (
        tmp_path / "one" / "train.bin"
    ).read_bytes()


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match="no file, folder or glob match"):
        prepare_data(DataConfig(path=str(tmp_path / "none*.txt")), tmp_path / "out")
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(DataError, match="no documents left"):
        prepare_data(DataConfig(path=str(tmp_path / "tiny.txt"), min_chars=10), tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_shipped_tinyshakespeare(tmp_path):
    path = default_corpus_path()
    readme = (path.parent / "README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in readme  # provenance note is current
    meta = prepare_data(DataConfig(vocab_size=300, num_workers=1), tmp_path)
    assert meta["source"] == str(path) and meta["split_method"] == "contiguous"
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    total = meta["train_chars"] + meta["val_chars"]
    assert total == meta["cleaning"]["chars_kept"] and 0.09 < meta["val_chars"] / total <= 0.1
    assert meta["val_bytes"] == meta["val_chars"]  # plain ASCII
    assert meta["train_tokens"] > 0.3 * meta["train_bytes"]  # small vocab: few merges


def test_reused_tokenizer_needs_an_end_of_text_token(tmp_path):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bare = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(DataError, match="tokenizer has no end-of-text token"):
        prepare_data(DataConfig(tokenizer=str(tmp_path / "bare.json")), tmp_path / "out")
    with pytest.raises(DataError, match="tokenizer file not found"):
        prepare_data(DataConfig(tokenizer=str(tmp_path / "nope.json")), tmp_path / "out")
