"""Supervised fine-tuning data: conversations → token ids with a loss mask → packed batches.

The steps before: records → messages in ``data/conversations.py``, messages → token ids and
loss mask in ``data/chat_template.py`` (``ChatFormat``).

encode_examples      conversations → (ids, trained) arrays, with the stated truncation policy
SFTBatches           endless (x, y, {"segments"}) batches, documents packed into rows with
                     per-document attention, exact-resume cursor — the TokenBatches interface

Loss mask: only assistant turns are trained (their content and the end-of-turn token that
closes them); ``train_on_prompt`` trains every token. Targets of untrained tokens are -100.

Truncation (``truncation``): an example longer than ``context + 1`` tokens is either cut at the
right (``right``, default: the beginning of the conversation is kept) or dropped (``drop``); an
example left without any trained token is dropped. Both are counted and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lmforge.config import Section
from lmforge.data.chat_template import ChatFormat, Message
from lmforge.errors import DataError

log = logging.getLogger(__name__)


class SFTDataConfig(Section):
    """Where the instruction data comes from and how it becomes training rows."""

    path: str | None = Field(
        None, description="JSON/JSONL file (alpaca, messages or sharegpt); null = the shipped suite"
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt", "qa"] = Field(
        "auto",
        description="record format; auto = decided per record by its keys (qa: question/answer, "
        "as GSM8K)",
    )
    eval_path: str | None = Field(
        None,
        description="records scored by exact match (e.g. a test split); null = hold out "
        "val_fraction of path",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="a bad record stops the run (fail) or is skipped and counted (skip)"
    )
    train_on_prompt: bool = Field(False, description="also train on system/user tokens")
    truncation: Literal["right", "drop"] = Field(
        "right", description="too-long examples: cut at the right end, or drop them"
    )
    pack: bool = Field(True, description="pack several examples per row (attention kept apart)")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of records held out for exact-match evaluation"
    )


# ---- examples and batches -----------------------------------------------------------------------


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0
    conversations: int = 0  # read in
    too_long: int = 0  # longer than a row (context + 1 tokens), cut or dropped
    cut_to_nothing: int = 0  # right-truncated before their first trained token, so dropped
    longest: int = 0  # tokens of the longest conversation
    context: int = 0
    truncation: str = "right"

    def why_empty(self) -> str:
        """Why no example is left, and which setting to change (for the error message)."""
        row = f"context_length={self.context}: rows of {self.context + 1} tokens"
        if not self.too_long:
            return (
                f"none of the {self.conversations} conversations has an assistant token to "
                "train on (set data.train_on_prompt=true to train on the prompts too)"
            )
        how = (
            "data.truncation=drop dropped them (set data.truncation=right to cut them instead)"
            if self.truncation == "drop"
            else f"data.truncation=right cut {self.cut_to_nothing} of them before their first "
            "assistant token"
        )
        return (
            f"{self.too_long} of {self.conversations} conversations are longer than a row "
            f"({row}; the longest has {self.longest} tokens) and {how}; raise context_length "
            f"to {self.longest - 1} (at most the model's context length) or shorten the examples"
        )


def encode_examples(
    convs: list[list[Message]],
    fmt: ChatFormat,
    context: int,
    train_on_prompt: bool = False,
    truncation: str = "right",
) -> tuple[list[tuple[np.ndarray, np.ndarray]], EncodeStats]:
    """Conversations → (ids, trained) examples of at most ``context + 1`` tokens each."""
    out = []
    stats = EncodeStats(conversations=len(convs), context=context, truncation=truncation)
    for conv in convs:
        ids, trained = fmt.encode(conv, train_on_prompt)
        stats.longest = max(stats.longest, len(ids))
        cut = len(ids) > context + 1
        if cut:
            stats.too_long += 1
            if truncation == "drop":
                stats.dropped += 1
                continue
            ids, trained = ids[: context + 1], trained[: context + 1]
            stats.truncated += 1
        if not trained[1:].any():  # the first token is never a target
            stats.dropped += 1
            stats.cut_to_nothing += cut
            continue
        out.append((ids, trained))
        stats.trained_tokens += int(trained[1:].sum())
    stats.examples = len(out)
    if stats.truncated or stats.dropped:
        log.info("SFT data: %d examples truncated, %d dropped", stats.truncated, stats.dropped)
    return out, stats


def example_xy(ids: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (n-1,) and targets (n-1,): targets of untrained tokens are -100."""
    y = ids[1:].astype(np.int64)
    return ids[:-1].astype(np.int64), np.where(trained[1:], y, -100)


class SFTBatches:
    """Endless SFT batches with the ``TokenBatches`` interface (next_batch, state_dict, …).

    Each epoch visits the examples in a seeded random order. With ``pack``, consecutive
    examples fill a row of ``context`` positions until the next does not fit; ``segments``
    (B, T) tells the model which document each position belongs to (padding is a document of
    its own), so attention and positions stay per document. Without ``pack`` a row holds one
    example. Rows are right-padded to the longest row of the batch (targets -100). The position
    is (epoch, examples consumed): exact resume with two integers.
    """

    def __init__(
        self,
        examples: list[tuple[np.ndarray, np.ndarray]],
        context: int,
        batch_size: int,
        seed: int,
        pad_id: int,
        pack: bool = True,
        stats: EncodeStats | None = None,
    ) -> None:
        """``stats``: what ``encode_examples`` reported, to say why no example is left."""
        if not examples:
            why = f": {stats.why_empty()}" if stats is not None else ""
            raise DataError(f"no SFT examples to train on{why}")
        too_long = [len(ids) for ids, _ in examples if len(ids) > context + 1]
        assert not too_long, f"examples longer than context + 1: {too_long[:3]}"
        self.examples, self.context, self.batch_size = examples, int(context), int(batch_size)
        self.seed, self.pad_id, self.pack = int(seed), int(pad_id), pack
        self.epoch, self.cursor = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                np.random.default_rng((self.seed, epoch)).permutation(len(self.examples)),
            )
        return self._order[1]

    def _take(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = example_xy(*self.examples[self.order(self.epoch)[self.cursor]])
        self.cursor += 1
        if self.cursor == len(self.examples):
            self.epoch, self.cursor = self.epoch + 1, 0
        return x, y

    def _peek_len(self) -> int:
        return len(self.examples[self.order(self.epoch)[self.cursor]][0]) - 1

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(x, y, {"segments": ...}) when packing, else (x, y); int64, shape (B, T), T ≤ context."""
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        for _ in range(self.batch_size):
            row, used = [self._take()], 0
            used = len(row[0][0])
            while self.pack and used + self._peek_len() <= self.context:
                row.append(self._take())
                used += len(row[-1][0])
            rows.append(row)
        T = max(sum(len(x) for x, _ in row) for row in rows)
        B = len(rows)
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), -100, dtype=np.int64)
        seg = np.zeros((B, T), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for d, (xs, ys) in enumerate(row):
                x[b, at : at + len(xs)], y[b, at : at + len(xs)] = xs, ys
                seg[b, at : at + len(xs)] = d
                at += len(xs)
            seg[b, at:] = len(row)  # padding: a document of its own
        out = (torch.from_numpy(x), torch.from_numpy(y))
        return (*out, {"segments": torch.from_numpy(seg)}) if self.pack else out

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "context": self.context,
            "n_examples": len(self.examples),
            "pack": int(self.pack),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "context", "n_examples", "pack"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the SFT data cursor: it was saved with {key}={state.get(key)}, "
                    f"this run has {key}={mine[key]}; resume with the same data and settings"
                )
        if not 0 <= int(state["cursor"]) < len(self.examples):
            raise DataError(f"SFT data cursor {state['cursor']} is outside the data")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class MixedBatches:
    """Replay: every batch holds ``rows`` rows of ``replay`` data next to the main rows.

    Both sources give (x, y) or (x, y, {"segments"}); rows are padded to a common length and
    a source without segments counts each row as one document. State = both cursors.
    """

    def __init__(self, main: Any, replay: Any, rows: int) -> None:
        self.main, self.replay, self.rows = main, replay, rows
        self.context = main.context

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        parts = [self.main.next_batch()]
        for _ in range(self.rows):  # one row at a time keeps the replay cursor exact
            parts.append(_first_row(self.replay))
        T = max(p[0].size(1) for p in parts)
        xs, ys, segs = [], [], []
        for p in parts:
            x, y = p[0], p[1]
            seg = p[2]["segments"] if len(p) > 2 else torch.zeros_like(x)
            pad = T - x.size(1)
            xs.append(torch.nn.functional.pad(x, (0, pad), value=0))
            ys.append(torch.nn.functional.pad(y, (0, pad), value=-100))
            segs.append(torch.nn.functional.pad(seg, (0, pad), value=int(seg.max()) + 1))
        return torch.cat(xs), torch.cat(ys), {"segments": torch.cat(segs)}

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.replay.load_state_dict(state["replay"])


def _first_row(source: Any) -> tuple[torch.Tensor, ...]:
    """One row from a batch source (its batch size is set to 1 for replay)."""
    assert source.batch_size == 1, "a replay source must have batch_size 1"
    return source.next_batch()
