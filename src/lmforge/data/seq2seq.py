"""Data for encoder-decoder models: source→target pairs and the two pretraining objectives.

* ``read_pairs``: JSONL ``{"source": ..., "target": ...}`` (errors name file, line and key).
* ``span_corruption`` (T5, Raffel et al. 2020 §3.1.4): ~15 % of the tokens, in spans of mean
  length 3, are cut out; each span becomes one sentinel in the input, and the target lists the
  spans, each after its sentinel, closed by one more sentinel.
* ``text_infilling`` (BART, Lewis et al. 2020 §2.2): spans with Poisson(3) lengths covering
  ~30 % of the tokens are each replaced by ONE mask token (a length-0 span inserts a mask); the
  target is the original text, so the model must also tell how many tokens each mask hides.
* ``PairBatches``: padded (source, labels, decoder inputs) micro-batches for ``fit``.

Both objectives place spans as T5's ``random_spans_noise_mask`` does — a random split of the
noise tokens into spans and of the kept tokens into the gaps between them — so the number of
noised tokens is exact and spans never touch (two touching spans would read as one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import DataError


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """A JSONL file of ``{"source": str, "target": str}`` objects → [(source, target)]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a JSONL file of {{source, target}} objects")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected an object with source and target")
            for key in ("source", "target"):
                if not isinstance(row.get(key), str):
                    got = "missing" if key not in row else type(row[key]).__name__
                    raise DataError(f"{path}:{n}: key {key!r} must be a string ({got})")
            pairs.append((row["source"], row["target"]))
    if not pairs:
        raise DataError(f'{path}: no pairs; each line must be {{"source": ..., "target": ...}}')
    return pairs


def _split(total: int, parts: int, rng: np.random.Generator, min_size: int) -> np.ndarray:
    """A uniformly random composition of ``total`` into ``parts`` sizes, each ≥ ``min_size``."""
    free = total - parts * min_size
    assert free >= 0
    cuts = np.sort(rng.choice(free + parts - 1, parts - 1, replace=False))
    sizes = np.diff(np.concatenate([[-1], cuts, [free + parts - 1]])) - 1
    return sizes + min_size


def _layout(n: int, span_lengths: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Where the spans go: (start, length) in order. The kept tokens are split at random into
    the gaps before, between and after the spans; the inner gaps get ≥ 1 token each, so spans
    never touch."""
    k = len(span_lengths)
    kept = n - int(span_lengths.sum())
    assert kept >= k - 1, "more spans than kept tokens can separate"
    gaps = _split(kept - (k - 1), k + 1, rng, 0)
    gaps[1:-1] += 1
    spans, pos = [], 0
    for gap, length in zip(gaps[:-1], span_lengths, strict=True):
        pos += int(gap)
        spans.append((pos, int(length)))
        pos += int(length)
    return spans


def span_corruption(
    ids: list[int],
    sentinels: list[int],
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5 span corruption: ids → (inputs, targets).

    round(len · noise_density) tokens (at least 1) are noised, in round(noise / mean_span)
    spans (at least 1, each ≥ 1 token); span i is replaced by ``sentinels[i]`` in the inputs,
    and the targets are ``sentinels[0] span0 sentinels[1] span1 … sentinels[k]``.
    """
    n = len(ids)
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    n_noise = min(max(1, round(n * noise_density)), n - 1)
    n_spans = max(1, min(round(n_noise / mean_span), n - n_noise + 1, n_noise))
    if n_spans + 1 > len(sentinels):
        raise ValueError(f"{n_spans + 1} sentinels needed, {len(sentinels)} given")
    lengths = _split(n_noise, n_spans, rng, 1)
    spans = _layout(n, lengths, rng)
    inputs, targets, pos = [], [], 0
    for i, (start, length) in enumerate(spans):
        inputs += ids[pos:start] + [sentinels[i]]
        targets += [sentinels[i]] + ids[start : start + length]
        pos = start + length
    inputs += ids[pos:]
    targets.append(sentinels[len(spans)])
    return inputs, targets


def text_infilling(
    ids: list[int],
    mask_id: int,
    rng: np.random.Generator,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
) -> tuple[list[int], list[int]]:
    """BART text infilling: ids → (inputs, targets = ids).

    round(len · mask_ratio) tokens are masked, in spans whose lengths are drawn from
    Poisson(``poisson_lambda``) (the last one cut to fit); every span — a length-0 one too,
    which inserts a mask without hiding anything — becomes exactly one ``mask_id``.
    """
    n = len(ids)
    if n < 1:
        raise ValueError("text infilling needs at least 1 token")
    n_mask = min(round(n * mask_ratio), n - 1)
    lengths: list[int] = []
    while sum(lengths) < n_mask or not lengths:
        lengths.append(int(rng.poisson(poisson_lambda)))
        if n_mask == 0:
            break
    over = sum(lengths) - n_mask
    lengths[-1] -= over  # the last span is cut so exactly n_mask tokens are hidden
    # spans are separated by ≥ 1 kept token: drop zero-length spans beyond what fits
    while len(lengths) - 1 > n - n_mask:
        if 0 in lengths:
            lengths.remove(0)
        else:  # merge the last two spans: the count of hidden tokens stays exact
            last = lengths.pop()
            lengths[-1] += last
    spans = _layout(n, np.array(lengths), rng)
    inputs, pos = [], 0
    for start, length in spans:
        inputs += ids[pos:start] + [mask_id]
        pos = start + length
    return inputs + ids[pos:], list(ids)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher forcing: decoder inputs = [start] + labels[:-1]; -100 labels become padding."""
    out = torch.full_like(labels, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return out


def pad_batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int, start_id: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """[(source ids, target ids)] → a ``fit`` micro-batch: (input_ids (B, S), labels (B, T)
    with -100 on padding, {"decoder_input_ids" (B, T), "attention_mask" (B, S)})."""
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples)
    x = torch.full((len(examples), S), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), S), dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        x[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        y[i, : len(t)] = torch.tensor(t)
    kw = {"decoder_input_ids": shift_right(y, start_id, pad_id), "attention_mask": mask}
    return x, y, kw


Noise = Callable[[list[int], np.random.Generator], tuple[list[int], list[int]]]
"""A pretraining objective: token ids → (inputs, targets), e.g. ``span_corruption`` bound to
its sentinels."""


class PairBatches:
    """Tokenised pairs → shuffled, padded micro-batches, epoch after epoch (a ``BatchSource``).

    With ``noise`` (pretraining) each example's source is corrupted afresh every time it is
    drawn, by a generator seeded from (seed, epoch, position): exact resume needs no RNG state.
    """

    def __init__(
        self,
        examples: list[tuple[list[int], list[int]]],
        batch_size: int,
        pad_id: int,
        start_id: int,
        seed: int,
        noise: Noise | None = None,
    ) -> None:
        if not examples:
            raise DataError("no training pairs")
        self.examples, self.batch_size, self.noise = examples, batch_size, noise
        self.pad_id, self.start_id, self.seed = pad_id, start_id, seed
        self.epoch, self.cursor = 0, 0
        self.context = max(len(s) for s, _ in examples)

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        rows: list[tuple[list[int], list[int]]] = []
        while len(rows) < self.batch_size:
            order = self._order()
            take = order[self.cursor : self.cursor + self.batch_size - len(rows)]
            if self.noise is None:
                rows += [self.examples[i] for i in take]
            else:
                rng = np.random.default_rng([self.seed, self.epoch, self.cursor])
                rows += [self.noise(self.examples[i][0], rng) for i in take]
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return pad_batch(rows, self.pad_id, self.start_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


MONTHS = (
    "January February March April May June July August September October November December"
).split()
DATE_FORMATS = (
    "{d} {month} {y}",
    "{month} {d}, {y}",
    "{dd}/{mm}/{y}",
    "{mon} {d} {y}",
    "{y}.{mm}.{dd}",
    "the {nth} of {month}, {y}",
)


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def date_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """The demo task, generated (no data file to ship or license): a date written one of six
    ways → ISO 8601, e.g. ("the 3rd of March, 1987", "1987-03-03"). A model must reorder,
    map month names to numbers and zero-pad: copying alone scores little."""
    rng = np.random.default_rng(seed)
    days = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    pairs = []
    for _ in range(n):
        y, m = int(rng.integers(1950, 2050)), int(rng.integers(1, 13))
        d = int(rng.integers(1, days[m - 1] + 1))
        fmt = DATE_FORMATS[int(rng.integers(len(DATE_FORMATS)))]
        month = MONTHS[m - 1]
        source = fmt.format(
            d=d, dd=f"{d:02d}", mm=f"{m:02d}", y=y, month=month, mon=month[:3], nth=_ordinal(d)
        )
        pairs.append((source, f"{y}-{m:02d}-{d:02d}"))
    return pairs
