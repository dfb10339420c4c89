"""Byte-level BPE: lossless round trips (also through transformers), determinism, file handling."""

from __future__ import annotations

import hashlib

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    SpecialTokens,
    bos_id,
    chunkable,
    declare_special_tokens,
    eos_id,
    load_tokenizer,
    pad_id,
    save_tokenizer,
    special_token_ids,
    special_tokens,
    tokenizer_sha256,
    train_tokenizer,
)
from lmforge.errors import DataError

from .conftest import SAMPLES, make_words

UNSEEN = [
    "Ελληνικά и кириллица",
    "עברית ومرحبا",
    "한국어 日本語のテキスト",
    "\x00\x01\x7f bytes",
    "🦀" * 3,
]


@pytest.mark.parametrize("text", SAMPLES + UNSEEN)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert max(ids, default=0) < tok.get_vocab_size()


def test_special_tokens_and_vocab_layout(tok):
    assert (bos_id(tok), eos_id(tok), pad_id(tok)) == (0, 1, 2)
    assert special_token_ids(tok) == {"bos": 0, "eos": 1, "pad": 2}
    assert [tok.id_to_token(i) for i in range(3)] == [BOS, EOS, PAD]
    assert tok.get_vocab_size() == 400  # the corpus has enough pairs to reach the target
    # The special tokens are whole tokens, and decoding skips them by default.
    assert tok.encode(f"{BOS}hi{EOS}").ids[0] == 0
    assert tok.decode(tok.encode(f"{BOS}hi{EOS}").ids) == "hi"


def test_training_is_deterministic(tmp_path):
    texts = [make_words(200, s) for s in range(3)] + SAMPLES
    a, b = train_tokenizer(texts, 350), train_tokenizer(texts, 350)
    save_tokenizer(a, tmp_path / "a.json")
    save_tokenizer(b, tmp_path / "b.json")
    assert tokenizer_sha256(tmp_path / "a.json") == tokenizer_sha256(tmp_path / "b.json")
    assert (
        tokenizer_sha256(tmp_path / "a.json")
        == hashlib.sha256((tmp_path / "a.json").read_bytes()).hexdigest()
    )


def test_training_input_cuts_do_not_change_the_tokenizer(monkeypatch):
    # train_tokenizer feeds the trainer token-neutral pieces; the result must not depend on it.
    text = "\n".join(make_words(12, s) + " 中文，标点。" for s in range(200))
    whole = train_tokenizer([text], 400).to_str()
    monkeypatch.setattr("lmforge.data.tokenizer.TRAIN_PIECE_CHARS", 64)
    assert train_tokenizer([text], 400).to_str() == whole


def test_vocab_size_must_hold_bytes_and_specials():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_tokenizer(["abc"], 258)


def test_save_load_and_errors(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temporary file
    loaded = load_tokenizer(path)
    assert loaded.encode(SAMPLES[2]).ids == tok.encode(SAMPLES[2]).ids
    assert load_tokenizer(path.parent).to_str() == loaded.to_str()  # a folder holding one
    with pytest.raises(DataError, match="missing.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"bad\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_transformers_loads_it_and_round_trips(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.get_vocab_size()
    for text in SAMPLES + UNSEEN:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text).ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == text
    ids = hf.encode("hi", add_special_tokens=False) + [hf.eos_token_id]
    assert hf.decode(ids, skip_special_tokens=False) == f"hi{EOS}"


def test_chunkable_only_for_plain_byte_level_bpe(tok):
    assert chunkable(tok)
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not chunkable(other)
    prefixed = Tokenizer.from_str(tok.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not chunkable(prefixed)


def test_declared_special_tokens_win_over_known_names():
    """A tokenizer with both GPT-2's and SentencePiece's names: guessing by name picks the first
    known one; what its files declare (recorded by the loader) wins, a role left undeclared is
    still guessed, and a role nothing provides is None (an error only where it is required)."""
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|endoftext|>", "<s>", "</s>"])
    assert special_tokens(tok) == SpecialTokens(bos=1, eos=0, pad=None)
    declare_special_tokens(tok, {"eos": 2})
    assert special_tokens(tok) == SpecialTokens(bos=1, eos=2, pad=None)
    assert (bos_id(tok), eos_id(tok), special_token_ids(tok)) == (1, 2, {"bos": 1, "eos": 2})
    with pytest.raises(DataError, match="no padding token"):
        pad_id(tok)
    with pytest.raises(AssertionError, match="outside"):
        declare_special_tokens(tok, {"bos": 99})
