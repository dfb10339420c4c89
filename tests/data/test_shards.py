"""Shards: dtype rule, safe cuts, parallel == serial tokenization, leak-free splits, open_shard."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmforge.data.shards import (
    encode_documents,
    open_shard,
    plan_workers,
    shard_dtype,
    split_documents,
    write_meta,
    write_shards,
)
from lmforge.data.tokenizer import EOS, eos_id, safe_pieces
from lmforge.errors import DataError

from .conftest import SAMPLES, make_words


def reference_ids(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Each whole document encoded on its own, then EOS: what any chunking must reproduce."""
    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    ids: list[int] = []
    for doc in docs:
        ids += plain.encode(doc).ids + [eos_id(tok)]
    return np.asarray(ids, dtype=np.uint32)


def tricky_text(seed: int, n: int = 400) -> str:
    """Random text dense in the whitespace patterns where pre-tokenization is context dependent."""
    rng = random.Random(seed)
    atoms = [
        "a",
        "bc",
        "Z",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        ".",
        "'s",
        "1",
        "中文",
        "🤖",
        " \n",
        "\r",
    ]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_dtype_rule():
    assert shard_dtype(2048) == np.uint16
    assert shard_dtype(65_535) == np.uint16
    assert shard_dtype(65_536) == np.uint32
    assert shard_dtype(128_256) == np.uint32


def test_safe_pieces_cut_only_between_non_blanks_around_a_newline():
    text = "\n".join(make_words(8, s) for s in range(50)) + "\n  indented\n\nblank before\n"
    pieces = safe_pieces(text, 40)
    assert "".join(pieces) == text and len(pieces) > 5
    for left, right in zip(pieces, pieces[1:], strict=False):
        assert left.endswith("\n") and not left[-2].isspace() and not right[0].isspace()


@pytest.mark.parametrize("seed", range(40))
def test_chunked_encoding_equals_whole_document_encoding(tok, seed):
    docs = [tricky_text(seed), tricky_text(seed + 1000, 50)]
    got = encode_documents(docs, tok, num_workers=1, piece_chars=16)
    np.testing.assert_array_equal(got, reference_ids(tok, docs))


def test_naive_cut_after_any_newline_would_change_tokens(tok):
    # Why the cut rule also looks at the character before "\n": "x  \nY" pre-tokenizes as
    # "x", "  ", "\n", "Y", but the piece "x  \n" alone ends in one "  \n" pre-token.
    def pieces(text: str) -> list[str]:
        return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]

    assert pieces("x  \nY") == ["x", "ĠĠ", "Ċ", "Y"]  # byte-level alphabet: Ġ = " ", Ċ = "\n"
    assert pieces("x  \n") == ["x", "ĠĠĊ"]
    assert safe_pieces("x  \nY", 1) == ["x  \nY"]  # so it is not a safe cut
    assert pieces("x\n") + pieces("Y") == pieces("x\nY")
    assert safe_pieces("x\nY", 1) == ["x\n", "Y"]


def test_parallel_equals_serial(tok):
    docs = [tricky_text(s, 300) for s in range(6)] + SAMPLES + ["\n".join(SAMPLES * 20)]
    serial = encode_documents(docs, tok, num_workers=1)
    parallel = encode_documents(docs, tok, num_workers=2, piece_chars=64, chars_per_worker=0)
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_array_equal(serial, reference_ids(tok, docs))
    assert (serial == eos_id(tok)).sum() == len(docs)  # one EOS per document, none inside


def test_literal_special_token_text_is_not_a_document_boundary(tok):
    ids = encode_documents([f"before {EOS} after"], tok, num_workers=1)
    assert (ids == eos_id(tok)).sum() == 1 and ids[-1] == eos_id(tok)
    assert tok.decode(ids[:-1].tolist()) == f"before {EOS} after"


def test_plan_workers():
    assert plan_workers(4, n_tasks=10, n_chars=10_000_000, chars_per_worker=2_000_000) == 4
    assert plan_workers(4, n_tasks=2, n_chars=10_000_000, chars_per_worker=2_000_000) == 2
    assert plan_workers(4, n_tasks=10, n_chars=1_000_000, chars_per_worker=2_000_000) == 1


def big_vocab_tokenizer() -> Tokenizer:
    """A byte-level BPE with 70,000 entries (no merges), built directly: uint32 territory."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|bos|>", "<|eos|>", "<|pad|>", *alphabet])}
    vocab |= {f"<unused{i}>": len(vocab) + i for i in range(70_000 - len(vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.mark.parametrize(
    ("make_tok", "dtype"), [(None, np.uint16), (big_vocab_tokenizer, np.uint32)]
)
def test_write_shards_counts_dtype_and_open_shard(tok, tmp_path, make_tok, dtype):
    tok = make_tok() if make_tok else tok
    splits = {"train": [make_words(50, s) for s in range(5)], "val": ["一个 val doc 🤖"]}
    counts, workers = write_shards(tmp_path, splits, tok, num_workers=2)
    assert workers == 1  # a few hundred characters: not worth a process
    meta = {"dtype": np.dtype(dtype).name} | {f"{k}_tokens": v for k, v in counts.items()}
    write_meta(tmp_path, meta)
    for name, docs in splits.items():
        assert (tmp_path / f"{name}.bin").stat().st_size == counts[name] * np.dtype(dtype).itemsize
        shard = open_shard(tmp_path, name)
        assert shard.dtype == dtype and len(shard) == counts[name]
        np.testing.assert_array_equal(shard, reference_ids(tok, docs))
    assert not list(tmp_path.glob(".*.tmp"))


def test_open_shard_checks_meta(tok, tmp_path):
    counts, _ = write_shards(tmp_path, {"train": ["abc"], "val": ["d"]}, tok, num_workers=1)
    write_meta(tmp_path, {"dtype": "uint16", "train_tokens": counts["train"] + 1, "val_tokens": 2})
    with pytest.raises(DataError, match=r"train\.bin: missing or not"):
        open_shard(tmp_path, "train")
    with pytest.raises(DataError, match="meta.json: not found"):
        open_shard(tmp_path / "elsewhere", "val")


# ------------------------------------------------------------------------------- splits


def test_single_document_split_is_contiguous_at_a_line_start():
    text = "".join(f"line {i:03d} of the play\n" for i in range(200))
    train, val, method = split_documents([text], 0.1, seed=0)
    assert method == "contiguous" and len(train) == len(val) == 1
    assert train[0] + val[0] == text
    cut = len(train[0])
    assert cut >= int(len(text) * 0.9) and train[0].endswith("\n") and val[0].startswith("line")
    assert cut - int(len(text) * 0.9) < len("line 000 of the play\n")  # the next line start
    # No newline after the cut point: cut at the exact character.
    train, val, _ = split_documents(["x" * 100], 0.25, seed=0)
    assert (len(train[0]), len(val[0])) == (75, 25)
    with pytest.raises(DataError, match="too short to split"):
        split_documents(["a"], 0.1, seed=0)


def test_multi_document_split_keeps_documents_whole_and_is_seeded():
    docs = [f"document {i}" for i in range(50)]
    train, val, method = split_documents(docs, 0.1, seed=3)
    assert method == "by_document" and len(val) == 5 and len(train) == 45
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert train == sorted(train, key=docs.index)  # corpus order kept within a split
    assert split_documents(docs, 0.1, seed=3)[1] == val
    assert split_documents(docs, 0.1, seed=4)[1] != val
    assert len(split_documents(docs[:2], 0.01, seed=0)[1]) == 1  # at least one val document
    with pytest.raises(DataError, match="no documents left"):
        split_documents([], 0.1, seed=0)
