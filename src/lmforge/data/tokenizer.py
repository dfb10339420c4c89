"""Byte-level BPE tokenizer: trained with Hugging Face ``tokenizers``, saved as ``tokenizer.json``.

Byte-level means the base alphabet is all 256 byte values, so any UTF-8 text (Chinese, emoji,
runs of spaces, ``\\t``, ``\\r``) encodes and decodes back to exactly the same string; there is
no unknown token and no normaliser. Special tokens come first: ``<|bos|>`` = 0,
``<|eos|>`` = 1, ``<|pad|>`` = 2; the 256 bytes are ids 3..258; merges follow.

The saved file loads in ``transformers`` as
``PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|bos|>", eos_token="<|eos|>",
pad_token="<|pad|>")``.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.atomic import atomic_write_text
from lmforge.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# End-of-text markers of common Hugging Face tokenizers, tried when reusing one of theirs.
EOS_ALIASES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_ALIASES = (BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
PAD_ALIASES = (PAD, "<pad>", "<|finetune_right_pad_id|>")

# A cut right after "\n" is token-neutral for byte-level BPE with the GPT-2 regex only when the
# characters on both sides are not whitespace: "a\nB" pre-tokenizes to "a", "\n", "B" whether
# or not it is cut after the "\n", but in "a \nB" the regex glues " \n" together at the end of
# a piece while splitting " ", "\n" inside the text (its \s+(?!\S) rule looks ahead).
# Python's \s is a superset of the tokenizer regex's \s, so this errs on the side of not cutting.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
TRAIN_PIECE_CHARS = 1 << 16  # training input pieces: lets the trainer count words in parallel


def safe_pieces(text: str, piece_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``piece_chars`` whose token ids, concatenated, equal
    the ids of the whole text, for ``chunkable`` tokenizers (see ``_SAFE_CUT``). A piece is
    longer when no safe cut exists."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        m = _SAFE_CUT.search(text, start + piece_chars)
        if m is None:
            break
        pieces.append(text[start : m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens and bytes included).

    Deterministic: the same texts in the same order give a byte-identical ``tokenizer.json``
    (BPE breaks ties between equally frequent pairs by the pair itself). A small corpus may
    stop short of ``vocab_size`` when no pair is left to merge; read ``get_vocab_size()``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    # No prefix space: a document's first word encodes as it is written, and decoding gives
    # the exact input back.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, seen in training or not, so unseen scripts still round-trip.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Cut at token-neutral points: the trainer sees the same words, counted in parallel
    # (one 1 MB document would otherwise be counted on one core).
    pieces = (piece for text in texts for piece in safe_pieces(text, TRAIN_PIECE_CHARS))
    tok.train_from_iterator(pieces, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write ``tok`` as ``tokenizer.json``, atomically (a crash never leaves half a file)."""
    atomic_write_text(Path(path), tok.to_str(pretty=True))


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` for a folder (checkpoint or HF model)."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (ours or a Hugging Face one); ``DataError`` if unusable."""
    path = tokenizer_file(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found (data.tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or schema
        raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None


def tokenizer_sha256(path: str | Path) -> str:
    """Hex sha256 of the tokenizer file's bytes: the identity a checkpoint is checked against."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of a tokenizer's beginning-of-text, end-of-text and padding tokens (None: it has none)."""

    bos: int | None
    eos: int | None
    pad: int | None


# What a tokenizer's own files declare (a Hugging Face folder's tokenizer_config.json, GGUF
# metadata...), recorded by the loader that read them (``declare_special_tokens``). Keyed weakly
# by the Tokenizer object, so the declaration travels with the tokenizer to every user
# (generate, eval, SFT, chat) without another argument, and dies with it.
_DECLARED: weakref.WeakKeyDictionary[Tokenizer, dict[str, int]] = weakref.WeakKeyDictionary()
_ALIASES = {"bos": BOS_ALIASES, "eos": EOS_ALIASES, "pad": PAD_ALIASES}
_WHAT = {"bos": "beginning-of-text", "eos": "end-of-text", "pad": "padding"}


def declare_special_tokens(tok: Tokenizer, ids: dict[str, int]) -> None:
    """Record the ids (``{"bos"|"eos"|"pad": id}``) that the files ``tok`` came with declare;
    ``special_tokens`` prefers them to guessing by name."""
    size = tok.get_vocab_size(with_added_tokens=True)
    bad = {k: i for k, i in ids.items() if k not in _ALIASES or not 0 <= i < size}
    assert not bad, f"declared special tokens outside roles bos/eos/pad or the vocab: {bad}"
    _DECLARED[tok] = dict(ids)


def special_tokens(tok: Tokenizer) -> SpecialTokens:
    """The one answer to "which id is BOS / EOS / PAD?" for every lmforge user of a tokenizer.

    A token its files declare wins (``declare_special_tokens``; ``interop/hf.py`` reads a
    Hugging Face folder's declarations as transformers does); otherwise the first of the
    known names (``BOS_ALIASES``...) the vocabulary has; otherwise None.
    """
    declared = _DECLARED.get(tok, {})
    found: dict[str, int | None] = {}
    for key, names in _ALIASES.items():
        ids = [tok.token_to_id(n) for n in names]
        found[key] = declared.get(key, next((i for i in ids if i is not None), None))
    return SpecialTokens(**found)


def _required(tok: Tokenizer, key: str) -> int:
    found = getattr(special_tokens(tok), key)
    if found is None:
        raise DataError(
            f"tokenizer has no {_WHAT[key]} token (none declared; looked for "
            f"{', '.join(_ALIASES[key])})"
        )
    return found


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token appended after every document; DataError if there is none."""
    return _required(tok, "eos")


def bos_id(tok: Tokenizer) -> int:
    """Id of the beginning-of-text token; DataError if there is none. Only an empty prompt needs
    one: callers that can do without read ``special_tokens(tok).bos``."""
    return _required(tok, "bos")


def pad_id(tok: Tokenizer) -> int:
    return _required(tok, "pad")


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """``{"bos": id, "eos": id, "pad": id}`` for the tokens this tokenizer has."""
    return {k: i for k, i in vars(special_tokens(tok)).items() if i is not None}


def chunkable(tok: Tokenizer) -> bool:
    """True if text can be cut at ``safe_cut_points`` without changing its tokens.

    That holds for a plain byte-level BPE with the GPT-2 split regex and no normaliser (ours,
    GPT-2's). Other tokenizers (SentencePiece-style, other regexes) are encoded whole.
    """
    spec = json.loads(tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
    )
