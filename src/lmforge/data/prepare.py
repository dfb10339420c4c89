"""The data-prepare stage: raw text → cleaned, deduplicated, tokenized, packed shards.

``prepare_data`` runs the stages top to bottom — read → clean → dedup → split → tokenizer
(trained on the train split only, or reused) → parallel tokenize → shards + ``meta.json`` —
logging one INFO line per stage. Each stage is a function in ``clean.py``, ``tokenizer.py``
or ``shards.py`` that can be run and tested alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from lmforge import __version__
from lmforge.atomic import atomic_write_bytes
from lmforge.config import Section
from lmforge.data.clean import clean_corpus
from lmforge.data.shards import load_meta, shard_dtype, split_documents, write_meta, write_shards
from lmforge.data.tokenizer import (
    MIN_VOCAB_SIZE,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    tokenizer_file,
    tokenizer_sha256,
    train_tokenizer,
)
from lmforge.errors import DataError

__all__ = [
    "DataConfig",
    "DataError",
    "default_corpus_path",
    "is_prepared",
    "load_meta",
    "prepare_data",
]

log = logging.getLogger(__name__)

META_FORMAT = "lmforge-token-shards-v1"
TOKENIZER_FILE = "tokenizer.json"


class DataConfig(Section):
    """Where the training text comes from and how it becomes token shards."""

    path: str | None = Field(
        None,
        description="a .txt/.jsonl file, a folder (searched recursively) or a glob; null = the "
        "shipped tinyshakespeare; a folder holding meta.json is already prepared and used as is",
    )
    text_field: str = Field(
        "text", min_length=1, description="the field of a .jsonl record holding its text"
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="undecodable UTF-8, malformed JSON or a missing field: fail (naming file and "
        "line) or skip the line/record and count it in meta.json",
    )
    vocab_size: int = Field(
        2048,
        ge=MIN_VOCAB_SIZE,
        description=f"BPE vocabulary size including the 256 bytes and 3 special tokens "
        f"(>= {MIN_VOCAB_SIZE}); ignored when data.tokenizer is set",
    )
    tokenizer: str | None = Field(
        None,
        description="an existing tokenizer.json (or a folder holding one) to reuse instead of "
        "training one; it is copied into the data folder",
    )
    val_fraction: float = Field(
        0.1,
        gt=0,
        le=0.5,
        description="share held out for validation: of the documents, or of the characters "
        "when the corpus is a single document",
    )
    normalize_unicode: bool = Field(
        True, description="Unicode NFKC (note: also turns full-width CJK punctuation into ASCII)"
    )
    strip_html: bool = Field(
        True,
        description="remove HTML tags, comments, script/style blocks and decode &entities; "
        "(turn off for source code, where vector<int> looks like a tag)",
    )
    min_chars: int = Field(0, ge=0, description="drop documents shorter than this after cleaning")
    max_chars: int | None = Field(
        None, ge=1, description="drop documents longer than this after cleaning"
    )
    dedup: bool = Field(True, description="remove exact duplicate documents (after cleaning)")
    near_dedup: bool = Field(True, description="remove near-duplicate documents (MinHash LSH)")
    near_dedup_threshold: float = Field(
        0.85,
        gt=0,
        le=1,
        description="estimated Jaccard similarity of word 5-grams at which a document is a near duplicate",
    )
    num_workers: int = Field(
        2,
        ge=1,
        description="tokenizer worker processes (1 = in-process; text under ~2M characters per "
        "worker is encoded in-process anyway, as spawning would cost more than it saves)",
    )

    @field_validator("max_chars")
    @classmethod
    def _above_min_chars(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A field validator (not a model one) so the error names the key: "max_chars: ...".
        low = info.data.get("min_chars", 0)
        if value is not None and value < low:
            raise ValueError(f"is below min_chars ({low}): every document would be dropped")
        return value


def default_corpus_path() -> Path:
    """The shipped tinyshakespeare text (public domain; see corpora/README.md)."""
    return Path(__file__).parent / "corpora" / "tinyshakespeare.txt"


def is_prepared(path: str | Path) -> bool:
    """True for a folder that ``prepare_data`` completed (it holds ``meta.json``)."""
    return Path(path).is_dir() and (Path(path) / "meta.json").is_file()


def prepare_data(cfg: DataConfig, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Turn ``cfg.path`` into ``train.bin``, ``val.bin``, ``tokenizer.json`` and ``meta.json``
    in ``out_dir``; return the meta dict.

    The returned dict also holds ``"data_dir"``: the folder with the shards — ``out_dir``, or
    ``cfg.path`` itself when that is an already prepared folder (then nothing is redone).
    ``seed`` drives the document split and the MinHash permutations.
    """
    if cfg.path is not None and is_prepared(cfg.path):
        meta = load_meta(cfg.path)
        log.info(
            "data: %s is already prepared (%s train / %s val tokens); using it as is",
            cfg.path,
            f"{meta['train_tokens']:,}",
            f"{meta['val_tokens']:,}",
        )
        return {**meta, "data_dir": str(Path(cfg.path))}
    # A reused tokenizer is checked before the (possibly long) cleaning, so a typo fails fast.
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if tok is not None:
        eos_id(tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A stale meta.json next to half-rewritten shards would mark the folder as complete.
    (out_dir / "meta.json").unlink(missing_ok=True)
    source = str(cfg.path) if cfg.path is not None else str(default_corpus_path())
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    docs, stats = clean_corpus(
        source,
        text_field=cfg.text_field,
        on_error=cfg.on_error,
        normalize_unicode=cfg.normalize_unicode,
        remove_html=cfg.strip_html,
        min_chars=cfg.min_chars,
        max_chars=cfg.max_chars,
        dedup=cfg.dedup,
        near_dedup=cfg.near_dedup,
        near_dedup_threshold=cfg.near_dedup_threshold,
        seed=seed,
    )
    seconds["clean"] = time.perf_counter() - t
    log.info(
        "clean: %d file(s), %d documents read, %d lines/records skipped, %d dropped by length "
        "or empty, %d exact + %d near duplicates removed, %d kept (%s chars) in %.1f s",
        stats.files,
        stats.documents_read,
        sum(stats.skipped.values()),
        stats.dropped_empty + stats.dropped_short + stats.dropped_long,
        stats.exact_duplicates,
        stats.near_duplicates,
        stats.kept,
        f"{stats.chars_kept:,}",
        seconds["clean"],
    )

    t = time.perf_counter()
    train, val, method = split_documents(docs, cfg.val_fraction, seed)
    seconds["split"] = time.perf_counter() - t
    log.info(
        "split (%s): %d train / %d val documents in %.1f s",
        method,
        len(train),
        len(val),
        seconds["split"],
    )

    t = time.perf_counter()
    tok_path = out_dir / TOKENIZER_FILE
    if cfg.tokenizer is not None and tok is not None:
        # A byte copy, so the folder is self-contained and the sha256 matches the original.
        atomic_write_bytes(tok_path, tokenizer_file(cfg.tokenizer).read_bytes())
        how = f"reused {cfg.tokenizer}"
    else:
        tok = train_tokenizer(train, cfg.vocab_size)  # train split only: val stays unseen
        save_tokenizer(tok, tok_path)
        how = "trained byte-level BPE on the train split"
    seconds["tokenizer"] = time.perf_counter() - t
    log.info("tokenizer: %s, vocab %d in %.1f s", how, tok.get_vocab_size(), seconds["tokenizer"])

    t = time.perf_counter()
    n_tokens, workers = write_shards(out_dir, {"train": train, "val": val}, tok, cfg.num_workers)
    seconds["tokenize"] = time.perf_counter() - t
    log.info(
        "tokenize: %s train / %s val tokens with %d worker(s) in %.1f s",
        f"{n_tokens['train']:,}",
        f"{n_tokens['val']:,}",
        workers,
        seconds["tokenize"],
    )

    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "dtype": shard_dtype(tok.get_vocab_size()).name,
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": special_token_ids(tok),
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": tokenizer_sha256(tok_path),
        "split_method": method,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
    }
    for name, texts in (("train", train), ("val", val)):
        meta[f"{name}_file"] = f"{name}.bin"
        meta[f"{name}_tokens"] = n_tokens[name]
        meta[f"{name}_documents"] = len(texts)  # = number of EOS tokens in the shard
        # bytes: UTF-8 of the text only (EOS separators have none) — the bits-per-byte divisor.
        meta[f"{name}_bytes"] = sum(len(d.encode("utf-8")) for d in texts)
        meta[f"{name}_chars"] = sum(map(len, texts))
    meta |= {
        "source": source,
        "cleaning": stats.to_dict(),
        "data_config": cfg.model_dump(mode="json"),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "lmforge_version": __version__,
    }
    write_meta(out_dir, meta)  # last: its presence marks the folder complete
    return {**meta, "data_dir": str(out_dir)}
