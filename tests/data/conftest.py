"""Shared fixtures for the data tests: a small multilingual corpus and a tokenizer trained on it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lmforge.data.tokenizer import train_tokenizer

WORDS = (
    "the quick brown fox jumps over lazy dog river stone light shadow king queen castle "
    "sword bread wine winter summer morning night friend letter garden window music"
).split()

# Text that stresses byte-level round trips: CJK, emoji with joiners and modifiers,
# combining marks, tabs, carriage returns, runs of spaces, leading and trailing blanks.
SAMPLES = [
    "Hello, world! It's a test of the tokenizer; don't panic.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "emoji 🤖🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "tabs\t\tand  spaces   \r\n mixed \n\n\n  whitespace\t \r",
    "  leading spaces and trailing  ",
    "Café naïve résumé — “quotes” e\u0301 ﬁ Ｆｕｌｌ",
    "code:\n    def f(x):\n\treturn x ** 2  # square\n",
    "\n",
    "",
]


def make_words(n: int, seed: int) -> str:
    """``n`` space-separated words drawn with a fixed seed (deterministic test text)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """A 400-entry byte-level BPE trained on a few kilobytes (fast; merges are exercised)."""
    texts = [make_words(300, s) + "\n" + "\n".join(SAMPLES) for s in range(5)]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture()
def write(tmp_path: Path):
    """``write("name.txt", str | bytes)`` → path under tmp_path (parents created)."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else content
        path.write_bytes(data)
        return path

    return _write
