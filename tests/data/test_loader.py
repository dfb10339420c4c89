"""TokenBatches: every window once per epoch, exact resume, disjoint ranks; eval windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenBatches, iter_eval_windows
from lmforge.errors import DataError

# Token value == position, so a window's start is readable from x[:, 0].
STREAM = np.arange(1000, dtype=np.uint16)


def batches(tb: TokenBatches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tb.next_batch() for _ in range(n)]


def test_batch_shapes_and_shift():
    x, y = TokenBatches(STREAM, context=16, batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one position in the stream


def test_every_window_once_per_epoch_with_moving_offsets():
    context = 16
    tb = TokenBatches(STREAM, context=context, batch_size=3, seed=0)
    offsets = []
    for epoch in range(4):
        starts = tb.epoch_starts(epoch)
        offset = int(starts.min()) % context
        offsets.append(offset)
        n_windows = (len(STREAM) - 1 - offset) // context
        expected = offset + context * np.arange(n_windows)
        np.testing.assert_array_equal(np.sort(starts), expected)  # the whole grid, each once
        assert not np.array_equal(starts, expected)  # in shuffled order
    assert len(set(offsets)) > 1 and all(0 <= o < context for o in offsets)

    # Drawing batches walks exactly those windows, a batch straddling the epoch boundary.
    n0 = len(tb.epoch_starts(0))
    seen = torch.cat([x[:, 0] for x, _ in batches(tb, -(-n0 // 3))]).numpy()
    np.testing.assert_array_equal(seen[:n0], tb.epoch_starts(0))
    np.testing.assert_array_equal(seen[n0:], tb.epoch_starts(1)[: len(seen) - n0])
    assert tb.epoch == 1 and tb.cursor == len(seen) - n0


def test_seed_changes_the_order():
    a = TokenBatches(STREAM, 16, 4, seed=0).epoch_starts(0)
    b = TokenBatches(STREAM, 16, 4, seed=1).epoch_starts(0)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("stop", [0, 1, 6, 13, 29])
def test_resume_is_exact(stop):
    # 300 tokens, context 8: ~37 windows an epoch, so 40 batches of 5 cross several epochs.
    tokens = np.arange(300, dtype=np.uint16)
    reference = batches(TokenBatches(tokens, 8, 5, seed=7), 40)

    first = TokenBatches(tokens, 8, 5, seed=7)
    head = batches(first, stop)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(type(v) is int for v in state.values())

    resumed = TokenBatches(tokens, 8, 5, seed=7)
    resumed.load_state_dict(state)
    tail = batches(resumed, 40 - stop)
    for (x, y), (rx, ry) in zip(head + tail, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_with_another_batch_size_continues_the_window_stream():
    tokens = np.arange(300, dtype=np.uint16)
    reference = torch.cat([x for x, _ in batches(TokenBatches(tokens, 8, 6, seed=1), 10)])
    a = TokenBatches(tokens, 8, 6, seed=1)
    head = torch.cat([x for x, _ in batches(a, 4)])
    b = TokenBatches(tokens, 8, 4, seed=1)
    b.load_state_dict(a.state_dict())
    tail = torch.cat([x for x, _ in batches(b, 9)])
    assert torch.equal(torch.cat([head, tail]), reference)


def test_resume_refuses_other_data_or_settings():
    state = TokenBatches(STREAM, 16, 4, seed=0).state_dict()
    with pytest.raises(DataError, match="saved with n_tokens=1000, this run has n_tokens=999"):
        TokenBatches(STREAM[:999], 16, 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="saved with context=16, this run has context=32"):
        TokenBatches(STREAM, 32, 4, seed=0).load_state_dict(state)


def test_ranks_take_disjoint_equal_shares_and_share_state():
    world = 3
    ranks = [TokenBatches(STREAM, 16, 2, seed=5, rank=r, world_size=world) for r in range(world)]
    shares = [set(tb.epoch_starts(0).tolist()) for tb in ranks]
    offset = min(min(s) for s in shares) % 16
    n_windows = (len(STREAM) - 1 - offset) // 16
    assert len({len(s) for s in shares}) == 1  # same number of steps on every rank
    assert len(set().union(*shares)) == sum(map(len, shares)) == n_windows // world * world
    for tb in ranks:
        batches(tb, 25)  # crosses into epoch 1
    assert len({str(tb.state_dict()) for tb in ranks}) == 1  # rank 0's state resumes any rank


def test_too_short_stream_is_a_clear_error():
    with pytest.raises(
        DataError, match=r"has 16 tokens, but one training window needs context \+ 1 = 17"
    ):
        TokenBatches(np.arange(16), context=16, batch_size=1, seed=0)
    TokenBatches(np.arange(17), context=16, batch_size=4, seed=0).next_batch()  # just enough
    with pytest.raises(DataError, match="window.* for 4 ranks"):
        TokenBatches(np.arange(40), context=16, batch_size=1, seed=0, world_size=4)


@pytest.mark.parametrize(("n", "context", "batch_size"), [(103, 10, 4), (101, 10, 3), (7, 10, 2)])
def test_eval_windows_predict_every_token_once_in_order(n, context, batch_size):
    tokens = np.arange(n, dtype=np.uint32) * 3
    xs, ys = zip(*iter_eval_windows(tokens, context, batch_size), strict=True)
    for x, y in zip(xs, ys, strict=True):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert x.shape[0] <= batch_size and x.shape[1] <= context
        assert torch.equal(y[:, :-1], x[:, 1:])
    targets = torch.cat([y.flatten() for y in ys]).numpy()
    inputs = torch.cat([x.flatten() for x in xs]).numpy()
    np.testing.assert_array_equal(targets, tokens[1:])  # each token after the first, once
    np.testing.assert_array_equal(inputs, tokens[:-1])
