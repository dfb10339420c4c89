"""Sampling and generation: KV-cache equivalence, reproducibility, parity of the logits
processors with transformers, and streaming detokenisation."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.generate import (
    SampleConfig,
    StreamDecoder,
    generate_batch,
    generate_text,
    generate_tokens,
    process_logits,
    sample_next,
)
from lmforge.models.decoder import Decoder, DecoderConfig

CONTEXT = 16
EOT = "<|endoftext|>"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "你好，世界！语言模型生成文本。",
    "Emoji time 🙂🚀 and accents: café, naïve.",
]
MIXED = "Hello 世界! 🚀 café 🙂 — 中文 text 👩‍💻."


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Models this small gain nothing from intra-op threads, and on a busy machine the thread
    # pool's spinning makes each step ~100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE; vocab_size 257 = the 256 bytes + EOT, so every multi-byte char splits."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


@pytest.fixture(scope="module", params=[257, 320], ids=["bytes", "bpe"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return make_tokenizer(request.param)


def make_model(arch: str, vocab_size: int = 64, context: int = CONTEXT) -> Decoder:
    torch.manual_seed(0)
    n_kv_head = 2 if arch == "llama" else None  # GQA: 2 kv heads for 4 query heads
    cfg = DecoderConfig(
        arch=arch,
        vocab_size=vocab_size,
        context_length=context,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=32,
        init="xavier",  # larger weights than gpt2 init: peakier, more varied output
    )
    return Decoder(cfg)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest) -> Decoder:
    return make_model(request.param)


def run(model: Decoder, prompt: list[int], **kw) -> list[int]:
    return list(generate_tokens(model, prompt, **kw))


@pytest.mark.parametrize("prompt_len", [3, CONTEXT + 4])
def test_greedy_cache_equals_no_cache_past_context(model: Decoder, prompt_len: int) -> None:
    prompt = [(7 * i) % 64 for i in range(prompt_len)]
    n = 2 * CONTEXT  # well past context_length
    cached = run(model, prompt, max_new_tokens=n, temperature=0.0, use_cache=True)
    uncached = run(model, prompt, max_new_tokens=n, temperature=0.0, use_cache=False)
    assert cached == uncached
    assert len(cached) == n and len(set(cached)) > 1


# ---- batched greedy generation (left padding + attention mask) ----------------------------------

PROMPTS = [[5], [3, 1, 4], [9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5], [1, 1]]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def wide_model(request: pytest.FixtureRequest) -> Decoder:
    """Context 40: prompts of 1-12 tokens + 20 new ones fit, so no window slides."""
    return make_model(request.param, context=40)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_greedy_rows_equal_each_prompt_alone(
    wide_model: Decoder, use_cache: bool, batch_size: int
) -> None:
    """Each row of a left-padded batch is generated as if alone: exact tokens, fp32, with and
    without the KV cache (gpt2's learned positions would shift with the padding otherwise)."""
    alone = [run(wide_model, p, max_new_tokens=20, temperature=0.0) for p in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(PROMPTS)  # the prompts lead somewhere different
    got = generate_batch(
        wide_model, PROMPTS, max_new_tokens=20, batch_size=batch_size, use_cache=use_cache
    )
    assert got == alone


def test_batched_rows_stop_at_their_own_eos(wide_model: Decoder) -> None:
    alone = [run(wide_model, p, max_new_tokens=20, temperature=0.0) for p in PROMPTS]
    eos = {alone[2][3], alone[0][6]}  # stops some rows early, at different steps
    expected = [run(wide_model, p, max_new_tokens=20, temperature=0.0, eos_id=eos) for p in PROMPTS]
    assert sorted(map(len, expected)) != sorted(map(len, alone))
    assert generate_batch(wide_model, PROMPTS, max_new_tokens=20, eos_id=eos) == expected


def test_batched_prompt_past_the_context_runs_alone(model: Decoder) -> None:
    """A prompt + max_new_tokens longer than the context slides its window as generate_tokens."""
    prompts = [[(7 * i) % 64 for i in range(CONTEXT - 2)], [4, 9]]
    alone = [run(model, p, max_new_tokens=CONTEXT, temperature=0.0) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=CONTEXT) == alone


@torch.inference_mode()
def test_left_padding_leaves_a_rows_logits_unchanged(wide_model: Decoder) -> None:
    """The model-level invariant behind batching: padded prefill + cached steps give the logits
    of the unpadded row (to fp32 rounding), and the padding row is finite (no NaN leaks)."""
    wide_model.eval()
    row, pad = [9, 2, 6, 5, 3], 4
    ref = wide_model(torch.tensor([row + [7, 1]]))  # (1, 7, V)
    ids = torch.tensor([[0] * pad + row])
    mask = torch.tensor([[False] * pad + [True] * len(row)])
    caches = wide_model.new_kv_caches(1, max_len=pad + len(row) + 2)
    pre = wide_model(ids, 0, caches, attention_mask=mask)  # (1, 9, V)
    assert torch.isfinite(pre).all()
    torch.testing.assert_close(pre[:, pad:], ref[:, : len(row)], rtol=1e-5, atol=1e-5)
    for k, t in enumerate([7, 1]):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.bool)], dim=1)
        step = wide_model(torch.tensor([[t]]), pad + len(row) + k, caches, attention_mask=mask)
        torch.testing.assert_close(step[:, 0], ref[:, len(row) + k], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_left_padding_stays_finite_in_bf16(wide_model: Decoder) -> None:
    """bf16 on CPU takes attend's own softmax, where a query with no visible key is NaN: a
    padding query sees itself, so nothing non-finite reaches the real tokens."""
    model = copy.deepcopy(wide_model).to(torch.bfloat16).eval()
    ids = torch.tensor([[0, 0, 0, 9, 2, 6], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])
    assert torch.isfinite(model(ids, attention_mask=mask).float()).all()


def test_generate_batch_checks_its_arguments(wide_model: Decoder) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(wide_model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(wide_model, [[1]], max_new_tokens=2, batch_size=0)


@torch.inference_mode()
def nanogpt_greedy(model: Decoder, prompt: list[int], n: int, penalty: float) -> list[int]:
    """The reference: crop to the context, full forward each step, penalise the whole sequence."""
    model.eval()
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq[-CONTEXT:]]))[:, -1]  # (1, V)
        cfg = SampleConfig(temperature=0.0, repetition_penalty=penalty)
        x = process_logits(logits, cfg, previous_ids=torch.tensor([seq]))
        seq.append(int(x.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_with_repetition_penalty_matches_reference(model: Decoder, use_cache: bool) -> None:
    prompt, n = [3, 1, 4, 1, 5], 2 * CONTEXT
    expected = nanogpt_greedy(model, prompt, n, penalty=1.5)
    assert expected != nanogpt_greedy(model, prompt, n, penalty=1.0)  # the penalty matters here
    kw = dict(max_new_tokens=n, temperature=0.0, repetition_penalty=1.5, use_cache=use_cache)
    assert run(model, prompt, **kw) == expected


def test_sampling_reproducible_and_cache_equivalent(model: Decoder) -> None:
    kw = dict(max_new_tokens=2 * CONTEXT, temperature=1.0, top_k=None, seed=7)
    first = run(model, [1, 2, 3], use_cache=True, **kw)
    assert first == run(model, [1, 2, 3], use_cache=True, **kw)
    assert first == run(model, [1, 2, 3], use_cache=False, **kw)
    assert first != run(model, [1, 2, 3], use_cache=True, **{**kw, "seed": 8})


def test_top_k_1_equals_greedy(model: Decoder) -> None:
    greedy = run(model, [5], max_new_tokens=20, temperature=0.0)
    assert run(model, [5], max_new_tokens=20, temperature=1.3, top_k=1) == greedy


def test_eos_stops_generation(model: Decoder) -> None:
    full = run(model, [4, 9], max_new_tokens=20, temperature=0.0)
    eos = full[5]
    expected = full[: full.index(eos)]
    for use_cache in (True, False):
        got = run(
            model, [4, 9], max_new_tokens=20, temperature=0.0, eos_id=eos, use_cache=use_cache
        )
        assert got == expected


def test_any_of_several_stop_ids_stops_generation(model: Decoder) -> None:
    """A chat model stops at its end-of-turn or its end-of-text token, whichever comes first."""
    full = run(model, [4, 9], max_new_tokens=20, temperature=0.0)
    first, later = full[4], full[9]
    expected = full[: min(full.index(first), full.index(later))]
    assert run(model, [4, 9], max_new_tokens=20, temperature=0.0, eos_id={later, first}) == expected
    assert run(model, [4, 9], max_new_tokens=20, temperature=0.0, eos_id=set()) == full


def test_steps_run_in_eval_inference_mode_and_nothing_leaks() -> None:
    model = make_model("gpt2")
    model.train()
    seen: list[tuple[bool, bool]] = []
    hook = model.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, torch.is_inference_mode_enabled()))
    )
    tokens = generate_tokens(model, torch.tensor([[1, 2]]), max_new_tokens=3, temperature=0.0)
    next(tokens)
    # Between tokens the caller must be free to train: no inference mode leaks out of a yield.
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert model.training
    assert len(list(tokens)) == 2 and model.training
    hook.remove()
    assert seen == [(False, True)] * 3


def test_bad_arguments_raise_at_call_time() -> None:
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="empty"):
        generate_tokens(model, [])
    with pytest.raises(ValueError, match="top_p"):
        generate_tokens(model, [1], top_p=1.5)
    with pytest.raises(ValueError, match="one sequence expected"):
        generate_tokens(model, torch.zeros(2, 3, dtype=torch.long))


def test_generate_tokens_defaults_match_sample_config() -> None:
    params = inspect.signature(generate_tokens).parameters
    for name, value in SampleConfig().model_dump().items():
        if name in params:
            assert params[name].default == value, name


def test_sample_config_validates() -> None:
    with pytest.raises(ValidationError):
        SampleConfig(temperature=-0.1)
    with pytest.raises(ValidationError):
        SampleConfig(top_p=0.0)
    with pytest.raises(ValidationError):
        SampleConfig(top_k=0)
    with pytest.raises(ValidationError):
        SampleConfig(temprature=1.0)


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, SampleConfig(temperature=1.0, top_k=None, top_p=0.5), g)
    assert (picks == 0).all()
    # p = 0.8 needs the two likeliest tokens; the third is never drawn.
    picks = sample_next(logits, SampleConfig(temperature=1.0, top_k=None, top_p=0.8), g)
    assert set(picks.tolist()) == {0, 1}


def test_top_k_never_picks_outside_k() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, SampleConfig(temperature=1.0, top_k=2), g)
    assert set(picks.tolist()) == {0, 1}


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    cfg = SampleConfig(temperature=0.0, top_k=3, top_p=0.2)
    assert torch.equal(sample_next(logits, cfg), logits.argmax(-1))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_processors_match_transformers(penalty: float) -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g) * 3
    previous = torch.randint(0, 50, (4, 12), generator=g)  # with repeats
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(previous, logits.clone())
    ours = process_logits(
        logits, SampleConfig(temperature=0.0, repetition_penalty=penalty), previous
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    chain = [
        lp.RepetitionPenaltyLogitsProcessor(penalty),
        lp.TemperatureLogitsWarper(0.7),
        lp.TopKLogitsWarper(20),
        lp.TopPLogitsWarper(0.9),
    ]
    ref = logits.clone()
    for processor in chain:
        ref = processor(previous, ref)
    cfg = SampleConfig(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=penalty)
    ours = process_logits(logits, cfg, previous)
    assert torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours, ref)


def test_stream_decoder_matches_decode(tokenizer: Tokenizer) -> None:
    eot = tokenizer.token_to_id(EOT)
    ids = tokenizer.encode(MIXED).ids + [eot] + tokenizer.encode(" 🙂 end 中").ids
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p or EOT in p for p in pieces)  # no half characters printed
    assert sum(len(p) > 0 for p in pieces) > 10  # and it did stream


def test_stream_decoder_flushes_an_unfinished_character() -> None:
    tok = make_tokenizer(257)
    ids = tok.encode("a中").ids[:-1]  # drop the last byte of 中
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "a"
    assert stream.flush() == "\ufffd" == tok.decode(ids)[1:]


def test_stream_decoder_decodes_after_its_context() -> None:
    # Sentencepiece-style decoders drop the leading space of a decode: after a prompt the first
    # word must keep it, so the prompt is decoded as context.
    tok = Tokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    assert StreamDecoder(tok, context_ids=[0]).push(1) == " world"
    assert StreamDecoder(tok).push(1) == "world" == tok.decode([1])


@pytest.mark.parametrize("prompt", ["", "To be"])
def test_generate_text_streams_what_it_returns(prompt: str) -> None:
    tok = make_tokenizer(257)
    model = make_model("llama", vocab_size=tok.get_vocab_size())
    cfg = SampleConfig(prompt=prompt, max_new_tokens=24, temperature=1.0, seed=3)
    eot = tok.token_to_id(EOT)
    chunks: list[str] = []
    text = generate_text(model, tok, prompt, cfg, bos_id=eot, eos_id=eot, on_text=chunks.append)
    assert text == "".join(chunks)
    prompt_ids = tok.encode(prompt).ids if prompt else [eot]
    kw = cfg.model_dump(exclude={"prompt", "stop_at_eos"})
    ids = list(generate_tokens(model, prompt_ids, eos_id=eot, **kw))
    assert text == tok.decode(ids) and len(ids) > 0


def test_generate_text_needs_a_prompt_or_bos() -> None:
    tok = make_tokenizer(257)
    with pytest.raises(ValueError, match="BOS"):
        generate_text(make_model("gpt2", 257), tok, "", SampleConfig(), bos_id=None, eos_id=None)


def test_softmax_of_processed_logits_is_a_distribution() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    probs = process_logits(logits, SampleConfig(temperature=0.9, top_k=10, top_p=0.5)).softmax(-1)
    assert math.isclose(float(probs.sum(-1).min()), 1.0, rel_tol=1e-5)
    assert ((probs > 0).sum(-1) <= 10).all() and ((probs > 0).sum(-1) >= 1).all()
