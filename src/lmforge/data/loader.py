"""Batches for pretraining (shuffled windows, exact-resume cursor) and for evaluation (in order).

Pretraining cuts the flat token stream into windows of ``context + 1`` tokens: ``x`` is the
first ``context`` tokens, ``y`` the same window shifted by one. Each epoch starts the window
grid at a seeded random offset in ``[0, context)`` — so window edges move between epochs —
and visits the non-overlapping windows of that grid in a seeded random order, each exactly
once. The whole position is two integers (epoch, windows consumed), which is what makes
resume exact and cheap.

``BatchSource`` is the interface ``train.loop.fit`` consumes; every training batch source
(``TokenBatches`` here, ``data/sft.py``, ``data/classification.py``, the MLM masking) has it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import torch

from lmforge.errors import DataError

MicroBatch: TypeAlias = (
    tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
)
"""(x, y) or (x, y, keyword tensors for ``model(x, **kw)``, e.g. SFT's packed ``segments``).
``y`` holds the targets, -100 where nothing is scored; every other element counts as one
token (or example, or label slot) in the loss normalisation. Tensors are on the CPU."""


@runtime_checkable
class BatchSource(Protocol):
    """What ``fit`` needs from its training data: endless batches and an exact-resume cursor.

    ``state_dict()`` must hold only what ``torch.load(weights_only=True)`` reads back (ints,
    strings, tensors, lists and dicts of them): it is saved in every checkpoint's train_state.
    """

    @property
    def context(self) -> int:
        """Sequence length of the validation windows ``fit`` scores (``val_tokens``)."""
        ...

    def next_batch(self) -> MicroBatch:
        """The next micro-batch; never runs out (a new epoch starts where one ends)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The cursor: after ``load_state_dict`` of it, ``next_batch`` continues identically."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TokenBatches:
    """Endless (x, y) batches from a token stream for one rank of ``world_size``.

    Ranks share the epoch's permutation and take interleaved parts of it (``rank::world_size``),
    cut to a common length so every rank makes the same number of steps; the state is the same
    on every rank, so rank 0's ``state_dict`` resumes all of them.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``tokens``: (n_tokens,) integer array, typically ``open_shard(dir, "train")``."""
        if context < 1 or batch_size < 1:
            raise ValueError(f"context and batch_size must be >= 1, got {context}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        n = len(tokens)
        if n < context + 1:
            raise DataError(
                f"the token stream has {n:,} tokens, but one training window needs context + 1 "
                f"= {context + 1:,}; use a smaller context (block size) or more data"
            )
        # Fewest windows any epoch can have (largest offset); each rank needs one per epoch.
        fewest = (n - self._max_offset(n, context)) // context
        if fewest < world_size:
            raise DataError(
                f"the token stream has {n:,} tokens: only {fewest} window(s) of {context + 1} "
                f"tokens for {world_size} ranks; use a smaller context or more data"
            )
        self.tokens, self.context, self.batch_size = tokens, int(context), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.cursor = 0  # windows of this rank's share of the epoch already consumed
        self._cached: tuple[int, np.ndarray] | None = None

    @staticmethod
    def _max_offset(n: int, context: int) -> int:
        # offset + context + 1 <= n, so the first window fits even in a short stream.
        return min(context, n - context)

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Start positions of this rank's windows in ``epoch``, in visiting order; (n_windows,)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n = len(self.tokens)
        # (seed, epoch) seeds the stream: unlike seed + epoch, runs with seeds s and s+1 don't
        # replay each other's epochs shifted by one.
        rng = np.random.default_rng((self.seed, epoch))
        offset = int(rng.integers(self._max_offset(n, self.context)))
        n_windows = (n - 1 - offset) // self.context
        per_rank = n_windows // self.world_size  # the rest (< world_size windows) sits out
        order = rng.permutation(n_windows)[: per_rank * self.world_size]
        starts = offset + self.context * order[self.rank :: self.world_size]
        self._cached = (epoch, starts)
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), both int64 of shape (batch_size, context); y[:, t] is the token
        that follows x[:, t] in the stream. A batch that reaches the end of an epoch continues
        into the next one, so batches are always full."""
        rows: list[np.ndarray] = []
        need = self.batch_size
        while need:
            starts = self.epoch_starts(self.epoch)
            take = starts[self.cursor : self.cursor + need]
            rows.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor == len(starts):
                self.epoch, self.cursor = self.epoch + 1, 0
        starts = np.concatenate(rows)
        window = np.asarray(self.tokens[starts[:, None] + np.arange(self.context + 1)])
        window = torch.from_numpy(window.astype(np.int64))  # (B, T + 1)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        """Plain ints (safe for ``torch.load(weights_only=True)``): the position plus what it
        is only meaningful for (seed, context, stream length, world size)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "context": self.context,
            "n_tokens": len(self.tokens),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where ``state`` was taken; the batch size may differ."""
        mine = self.state_dict()
        for key in ("seed", "context", "n_tokens", "world_size"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data cursor: it was saved with {key}={state.get(key)}, "
                    f"this run has {key}={mine[key]}; resume with the same data and settings"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if not 0 <= cursor < max(len(self.epoch_starts(epoch)), 1):
            raise DataError(f"data cursor {cursor} is outside epoch {epoch}'s windows")
        self.epoch, self.cursor = epoch, cursor


def iter_eval_windows(
    tokens: np.ndarray, context: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Walk the whole stream in order: every token after the first is a target exactly once.

    Yields int64 (x, y) of shape (b, context) with b <= batch_size, the windows stepping by
    ``context`` (each overlaps the next by the one token that is target here and input
    there), then, if the stream does not divide evenly, the last partial window alone as
    (1, r) with r < context. Summed loss over all yields / (n_tokens - 1) is the mean loss.
    """
    n = len(tokens)
    if n < 2:
        raise DataError(f"the token stream has {n} token(s); evaluation needs at least 2")
    n_full = (n - 1) // context
    offsets = np.arange(context + 1)
    for first in range(0, n_full, batch_size):
        starts = context * np.arange(first, min(first + batch_size, n_full))
        window = torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets]).astype(np.int64))
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (b, T), (b, T)
    rest = (n - 1) - n_full * context
    if rest:
        tail = torch.from_numpy(np.asarray(tokens[n_full * context :]).astype(np.int64))
        yield tail[None, :-1], tail[None, 1:]  # (1, r), (1, r)
