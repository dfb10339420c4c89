"""The seq2seq data rules: T5 span corruption and BART text infilling (counts, spans, sentinels,
reconstruction), JSONL pairs with errors that name the line, and padded teacher-forcing batches."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.seq2seq import (
    PairBatches,
    pad_batch,
    read_pairs,
    shift_right,
    span_corruption,
    text_infilling,
)
from lmforge.errors import DataError

SENTINELS = list(range(1000, 900, -1))  # T5 counts its sentinels down from the vocab's end
MASK = 999


def _runs(flags: list[bool]) -> list[int]:
    """Lengths of the runs of True."""
    out, n = [], 0
    for f in [*flags, False]:
        if f:
            n += 1
        elif n:
            out, n = [*out, n], 0
    return out


@pytest.mark.parametrize("n", [2, 3, 10, 57, 200])
def test_span_corruption_rules(n: int) -> None:
    for seed in range(20):
        ids = list(range(n))  # distinct tokens: positions are recoverable
        inputs, targets = span_corruption(ids, SENTINELS, np.random.default_rng(seed))
        sent_in = [t for t in inputs if t in SENTINELS]
        k = len(sent_in)
        # sentinels in order, one per span, and the targets close with one more
        assert sent_in == SENTINELS[:k]
        assert [t for t in targets if t in SENTINELS] == SENTINELS[: k + 1]
        assert targets[0] == SENTINELS[0] and targets[-1] == SENTINELS[k]
        # noise count and span count follow T5's rounding
        n_noise = min(max(1, round(n * 0.15)), n - 1)
        assert len(targets) - (k + 1) == n_noise
        assert len(inputs) - k == n - n_noise
        assert k == max(1, min(round(n_noise / 3), n - n_noise + 1, n_noise))
        # filling each sentinel with its span gives back the text; spans are non-empty and
        # never touch (two sentinels are never adjacent in the inputs)
        spans: dict[int, list[int]] = {}
        for t in targets[:-1]:
            if t in SENTINELS:
                cur = spans.setdefault(t, [])
            else:
                cur.append(t)
        assert all(spans[s] for s in sent_in)
        rebuilt = [x for t in inputs for x in (spans[t] if t in SENTINELS else [t])]
        assert rebuilt == ids
        assert not any(a in SENTINELS and b in SENTINELS for a, b in pairwise(inputs))


def test_span_lengths_average_three() -> None:
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(200):
        _, targets = span_corruption(list(range(400)), SENTINELS, rng)
        lengths += [len(s) for s in _split_on(targets, SENTINELS)]
    assert abs(np.mean(lengths) - 3.0) < 0.2


def _split_on(seq: list[int], seps: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for t in seq:
        if t in seps:
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


@pytest.mark.parametrize("n", [1, 2, 5, 30, 300])
def test_text_infilling_rules(n: int) -> None:
    for seed in range(20):
        ids = list(range(n))
        inputs, targets = text_infilling(ids, MASK, np.random.default_rng(seed))
        assert targets == ids  # BART reconstructs the whole original
        kept = [t for t in inputs if t != MASK]
        n_mask = min(round(n * 0.3), n - 1)
        assert len(kept) == n - n_mask  # exactly 30 % hidden
        assert kept == sorted(kept)  # the visible tokens keep their order
        assert MASK in inputs  # every example has at least one span
        assert not any(a == MASK == b for a, b in pairwise(inputs))  # one mask per span
        # each mask hides a contiguous run: the hidden tokens between visible neighbours
        hidden = set(ids) - set(kept)
        gaps = [b - a - 1 for a, b in zip([-1, *kept], [*kept, n], strict=True)]
        assert sum(gaps) == len(hidden)


def test_text_infilling_span_lengths_are_poisson() -> None:
    """Span lengths (zero-length insertions included) average λ = 3 on long texts."""
    rng = np.random.default_rng(1)
    lengths = []
    for _ in range(100):
        inputs, _ = text_infilling(list(range(1000)), MASK, rng)
        kept = [-1] + [t for t in inputs if t != MASK] + [1000]
        pos = 0  # walk the inputs: each mask hides the gap to the next visible token
        for i, t in enumerate(inputs):
            if t == MASK:
                nxt = next((u for u in inputs[i + 1 :] if u != MASK), 1000)
                prev = kept[pos]
                lengths.append(nxt - prev - 1)
            else:
                pos += 1
    assert abs(np.mean(lengths) - 3.0) < 0.3
    assert 0 in lengths  # Poisson(3) gives length 0 ~5 % of the time: insertions exist


def test_read_pairs_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"source": "a b", "target": "b a"}) + "\n\n", encoding="utf-8")
    assert read_pairs(good) == [("a b", "b a")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "x", "target": "y"}\n{"source": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: key 'target' must be a string \(missing\)"):
        read_pairs(bad)
    bad.write_text('{"source": "x", "target": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":1: key 'target' must be a string \(int\)"):
        read_pairs(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=":1: not valid JSON"):
        read_pairs(bad)
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "missing.jsonl")


def test_shift_right_starts_with_the_start_token() -> None:
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert shift_right(labels, start_id=0, pad_id=1).tolist() == [[0, 5, 6, 7], [0, 8, 1, 1]]


def test_pad_batch_and_exact_resume() -> None:
    examples = [([i + 2] * (1 + i % 4), [i + 2] * (1 + i % 3)) for i in range(10)]
    x, y, kw = pad_batch(examples[:3], pad_id=0, start_id=1)
    assert x.tolist()[0] == [2, 0, 0] and kw["attention_mask"].tolist()[0] == [1, 0, 0]
    assert y.tolist()[1] == [3, 3, -100]
    assert kw["decoder_input_ids"].tolist()[1] == [1, 3, 3]
    a = PairBatches(examples, 4, 0, 1, seed=7)
    for _ in range(3):
        a.next_batch()
    b = PairBatches(examples, 4, 0, 1, seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(4):  # crosses epoch boundaries
        xa, ya, _ = a.next_batch()
        xb, yb, _ = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
