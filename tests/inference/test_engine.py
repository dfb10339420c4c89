"""The continuous-batching engine: each request's tokens equal the request run alone
(``generate_tokens``, the reference path), whatever joins and leaves beside it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tests.test_generate import MIXED, make_model, make_tokenizer

from lmforge.generate import SampleConfig, generate_tokens, stream_text
from lmforge.inference import engine as engine_module
from lmforge.inference.engine import Delta, Engine, PromptTooLong, QueueFull, Request
from lmforge.models.decoder import Decoder

PROMPTS = [[5], [3, 1, 4], [9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5], [1, 1],
           [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], [8, 6]]  # fmt: skip
BUDGETS = [20, 7, 13, 3, 20, 11, 1]  # rows leave at different steps


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest) -> Decoder:
    return make_model(request.param, context=48)


def req(prompt: list[int], n: int, temperature: float = 0.0, seed: int = 0, **kw) -> Request:
    sample = SampleConfig(max_new_tokens=n, temperature=temperature, top_k=None, seed=seed)
    return Request(prompt, sample, **kw)


def alone(model: Decoder, r: Request) -> list[int]:
    s = r.sample
    return list(generate_tokens(model, r.prompt_ids, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                seed=s.seed, eos_id=set(r.stop_ids) or None))  # fmt: skip


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_greedy_rows_equal_each_request_alone(model: Decoder, max_batch: int) -> None:
    """Rows of different lengths join as others leave (max_batch 3 < 7 requests)."""
    requests = [req(p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    expected = [alone(model, r) for r in requests]
    assert len({tuple(e) for e in expected}) == len(requests)
    got = Engine(model, max_batch=max_batch).run(requests)
    assert [c.token_ids for c in got] == expected
    assert [c.finish_reason for c in got] == ["length"] * len(requests)


def test_rows_equal_alone_when_the_cache_must_compact(model: Decoder) -> None:
    """max_len 30: long and short rows cannot all sit right-aligned, so the engine compacts,
    shifts and makes requests wait; tokens are still each request's own."""
    requests = [req(p, 30 - len(p) - i % 3) for i, p in enumerate(PROMPTS)]
    expected = [alone(model, r) for r in requests]
    engine = Engine(model, max_batch=4, max_len=30)
    assert [c.token_ids for c in engine.run(requests)] == expected


def test_seeded_sampling_is_reproducible_per_request(model: Decoder) -> None:
    requests = [req(p, 15, temperature=1.0, seed=100 + i) for i, p in enumerate(PROMPTS)]
    expected = [alone(model, r) for r in requests]
    assert len({tuple(e) for e in expected}) == len(requests)
    got = Engine(model, max_batch=4).run(requests)
    assert [c.token_ids for c in got] == expected
    # The same request beside different neighbours, in another order
    again = Engine(model, max_batch=3).run(requests[::-1])
    assert [c.token_ids for c in again] == expected[::-1]


def test_stop_ids_end_a_row_without_the_stop_token(model: Decoder) -> None:
    free = alone(model, req(PROMPTS[2], 20))
    stop = free[5]
    got = Engine(model).run([req(PROMPTS[2], 20, stop_ids=frozenset({stop})), req([3], 20)])
    assert got[0].token_ids == free[: free.index(stop)]
    assert got[0].finish_reason == "stop"
    assert got[1].token_ids == alone(model, req([3], 20))


def test_batch_equals_alone_with_sdpa_and_bf16_free_paths() -> None:
    """A wider model (peakier logits would hide differences less): still exact in fp32."""
    torch.manual_seed(0)
    wide = make_model("llama", vocab_size=256, context=64)
    requests = [req([(7 * i + j) % 256 for j in range(1 + 3 * i)], 25) for i in range(6)]
    expected = [alone(wide, r) for r in requests]
    assert [c.token_ids for c in Engine(wide, max_batch=6).run(requests)] == expected


# ---- text: UTF-8 and stop strings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def texty() -> tuple[Decoder, object]:
    tok = make_tokenizer(257)  # byte-level: every non-ASCII character spans several tokens
    return make_model("llama", vocab_size=tok.get_vocab_size(), context=160), tok


def deltas_of(engine: Engine, r: Request) -> list[Delta]:
    out: list[Delta] = []
    engine.submit(r, out.append)
    while engine.active or engine.waiting:
        engine.step()
    return out


def test_streamed_text_never_splits_a_character(texty) -> None:
    model, tok = texty
    prompt = tok.encode(MIXED).ids
    r = req(prompt, 60, temperature=1.5, seed=3)
    deltas = deltas_of(Engine(model, tok), r)
    ids = [t for d in deltas for t in d.token_ids]
    text = "".join(d.text for d in deltas)
    assert any(ord(c) > 127 for c in text), "the sample should hold multi-byte characters"
    assert ids == alone(model, r)
    # Some tokens were held back (a character's first bytes) and sent with the rest: a split
    # character would show as U+FFFD in the joined pieces where the whole decode has it whole.
    assert any(d.text == "" for d in deltas[:-1])
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


@pytest.mark.parametrize("cut", [(10, 3), (25, 1), (4, 7)])
def test_stop_strings_never_leak(texty, cut: tuple[int, int]) -> None:
    model, tok = texty
    prompt = tok.encode("Hello ").ids
    free = Engine(model, tok).run([req(prompt, 60, temperature=1.5, seed=7)])[0].text
    start, length = cut
    stop = free[start : start + length]  # a string the model is known to produce
    assert stop and stop.strip()
    r = req(prompt, 60, temperature=1.5, seed=7, stop=(stop, "\x00never"))
    deltas = deltas_of(Engine(model, tok), r)
    text = "".join(d.text for d in deltas)
    assert text == free[: free.find(stop)]
    assert deltas[-1].finish_reason == "stop"
    # No prefix of the stop string was streamed and later taken back
    streamed = ""
    for d in deltas:
        streamed += d.text
        assert stop not in streamed


# ---- queue, limits, cancellation ----------------------------------------------------------------


def test_queue_is_bounded_and_prompts_must_fit(model: Decoder) -> None:
    engine = Engine(model, max_batch=1, max_queue=1)
    engine.submit(req([1], 5), lambda d: None)  # takes the free slot at the next step
    engine.submit(req([1], 5), lambda d: None)  # waits
    with pytest.raises(QueueFull):
        engine.submit(req([1], 5), lambda d: None)
    with pytest.raises(PromptTooLong, match="more than the 48 tokens"):
        engine.submit(req(list(range(40)), 9), lambda d: None)
    with pytest.raises(ValueError, match="empty"):
        engine.submit(req([], 5), lambda d: None)


def test_cancel_stops_decoding_the_request(model: Decoder) -> None:
    engine = Engine(model, max_batch=4)
    first = threading.Event()
    deltas: list[Delta] = []

    def on_delta(d: Delta) -> None:
        deltas.append(d)
        first.set()

    other: list[Delta] = []
    engine.start()
    try:
        slow = engine.submit(req([2, 3], 45), on_delta)
        keep = engine.submit(req([5], 40), other.append)
        assert first.wait(10)
        slow.cancel()
        assert slow.done.wait(10)
        steps = slow.steps
        assert keep.done.wait(30)
        time.sleep(0.05)
        assert slow.steps == steps < 45  # nothing was drawn for it after the cancel
        assert deltas[-1].finish_reason == "cancelled"
        assert [t for d in other for t in d.token_ids] == alone(model, req([5], 40))
    finally:
        engine.stop()
    assert engine.active == 0


def test_logprobs_are_the_models(model: Decoder) -> None:
    r = req(PROMPTS[1], 4, logprobs=2)
    got = Engine(model).run([r])[0]
    assert got.logprobs is not None and len(got.logprobs) == 4
    ids = list(PROMPTS[1])
    for lp in got.logprobs:
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-5)
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the likeliest
        ids.append(lp.token_id)


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_stream_text_through_the_engine_equals_the_reference_path(texty, temperature) -> None:
    """``generate``/``chat`` stream through the engine; ``use_cache=False`` takes
    ``generate_tokens`` without a cache: same text, same pieces joined."""
    model, tok = texty
    prompt = tok.encode("Emoji time ").ids
    cfg = SampleConfig(max_new_tokens=40, temperature=temperature, seed=5)
    pieces: list[str] = []
    text = stream_text(model, tok, prompt, cfg, eos_id=0, on_text=pieces.append)
    ref = stream_text(model, tok, prompt, cfg.model_copy(update={"use_cache": False}), eos_id=0)
    assert text == ref == "".join(pieces) and len(pieces) > 1


def test_long_prompts_prefill_in_chunks_as_alone(model: Decoder, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 5)  # prompts of 1-22 tokens: 1-5 chunks
    requests = [req(p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    expected = [alone(model, r) for r in requests]
    assert [c.token_ids for c in Engine(model, max_batch=3).run(requests)] == expected
