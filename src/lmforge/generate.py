"""Sampling + KV cache, shared by the CLI, eval and the server.

process_logits   repetition penalty → temperature → top-k → top-p (transformers' order)
sample_next      one draw (or argmax at temperature 0) from processed logits
generate_tokens  a generator of new token ids: prefill once, then one token per step
generate_batch   greedy continuations of many prompts through the batched engine (eval scoring)
StreamDecoder    token ids → printable text, never splitting a UTF-8 character
generate_text    prompt string → generated string, streamed through a callback
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from itertools import chain

import torch
from pydantic import Field
from tokenizers import Tokenizer

from lmforge.config import Section
from lmforge.eval.mode import eval_mode
from lmforge.models.decoder import Decoder
from lmforge.models.layers import KVCache


class SampleConfig(Section):
    """How to sample a continuation of a prompt."""

    prompt: str = Field("", description="text to continue; empty = start from the BOS token")
    max_new_tokens: int = Field(200, gt=0, description="tokens to generate at most")
    temperature: float = Field(0.8, ge=0.0, description="softmax temperature; 0 = greedy (argmax)")
    top_k: int | None = Field(200, gt=0, description="keep the k likeliest tokens; null = all")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus mass; null = off")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="CTRL penalty on seen tokens; 1 = off"
    )
    seed: int = Field(1337, description="seed of the sampling RNG: same seed, same text")
    use_cache: bool = Field(True, description="reuse keys/values of earlier positions (KV cache)")
    stop_at_eos: bool = Field(True, description="stop when the model emits the EOS token")


def process_logits(
    logits: torch.Tensor, cfg: SampleConfig, previous_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """logits (B, V) → float32 logits (B, V) with filtered tokens at -inf; the input is untouched.

    Same maths and order as transformers' RepetitionPenaltyLogitsProcessor, then the
    Temperature, TopK and TopP warpers. ``previous_ids`` (B, T) are the tokens the repetition
    penalty applies to. At temperature 0 only the penalty is applied (the caller takes the argmax).
    Only the sampling fields of ``cfg`` are read, so a server can validate one per request.
    """
    x = logits.float()
    penalty = cfg.repetition_penalty
    if penalty != 1.0 and previous_ids is not None and previous_ids.numel():
        # CTRL (Keskar et al. 2019): dividing a negative logit would *raise* its probability,
        # so negative logits are multiplied instead.
        seen = x.gather(1, previous_ids)  # (B, T)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        x = x.scatter(1, previous_ids, seen)
    if cfg.temperature == 0:
        return x
    x = x / cfg.temperature
    if cfg.top_k is not None:
        kth = torch.topk(x, min(cfg.top_k, x.size(-1))).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th token survive
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # (B, V), ascending probabilities
        drop = cum <= 1 - cfg.top_p  # the unlikely tail whose mass stays below 1 - p
        drop[:, -1] = False  # always keep the likeliest token
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return x


def sample_next(
    logits: torch.Tensor,
    cfg: SampleConfig,
    generator: torch.Generator | None = None,
    previous_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) → next ids (B,) int64. Temperature 0 is greedy and draws no randomness."""
    x = process_logits(logits, cfg, previous_ids)
    if cfg.temperature == 0:
        return x.argmax(dim=-1)
    return torch.multinomial(x.softmax(dim=-1), 1, generator=generator).squeeze(1)


def generate_tokens(
    model: Decoder,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 1337,
    use_cache: bool = True,
    eos_id: int | Collection[int] | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids, one at a time, continuing ``prompt_ids``.

    ``prompt_ids``: ids, or a (T,) / (1, T) tensor; ``[bos_id]`` for an empty prompt. Stops after
    ``max_new_tokens`` or when ``eos_id`` (one id, or several: a chat model's end-of-turn and
    end-of-text) is drawn; the stop token is not yielded: fewer tokens than asked means the
    model stopped. Past ``context_length`` the model sees the last ``context_length``
    tokens (as nanoGPT) with or without the cache, so both paths give the same tokens.
    Arguments are checked at call time; the work starts on the first ``next()``.
    """
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() > 1 and prompt_ids.size(0) != 1:
            raise ValueError(f"prompt_ids: one sequence expected, got {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.reshape(-1).tolist()
    tokens = [int(t) for t in prompt_ids]
    stop = _stop_set(eos_id)
    if not tokens:
        raise ValueError("prompt_ids is empty: pass at least one token (the BOS id for no prompt)")
    # Building the config checks the ranges exactly as a YAML file's are checked.
    cfg = SampleConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)

    def steps() -> Iterator[int]:
        L = model.cfg.context_length
        # Caches never need more than the context; a short generation needs less.
        max_len = min(L, len(tokens) + max_new_tokens)
        caches: list[KVCache] | None = None
        pos = 0  # positions the caches hold
        for _ in range(max_new_tokens):
            # Eval mode per step, not around the whole generator: a generator suspended at
            # ``yield`` inside inference mode would leave it on in the caller's thread.
            with eval_mode(model, inference=True):
                if use_cache and caches is not None and len(tokens) <= L:
                    last = torch.tensor([tokens[-1:]], device=device)  # (1, 1)
                    logits = model(last, pos, caches)[:, -1]  # (1, V)
                    pos += 1
                else:
                    # No cache, or (re-)prefill: the last L tokens, as nanoGPT crops. Past the
                    # context the caches are rebuilt every step: the window shifts, so every
                    # position changes and the cached keys no longer match it.
                    window = torch.tensor([tokens[-L:]], device=device)  # (1, ≤L)
                    caches = model.new_kv_caches(1, max_len=max_len) if use_cache else None
                    logits = model(window, 0, caches)[:, -1]  # (1, V)
                    pos = window.size(1)
                # The penalty sees the whole sequence, prompt included (as transformers).
                seen = torch.tensor([tokens], device=device) if repetition_penalty != 1 else None
                next_id = sample_next(logits, cfg, generator, seen)
            token = int(next_id[0])
            if token in stop:
                return
            tokens.append(token)
            yield token

    return steps()


def _stop_set(eos_id: int | Collection[int] | None) -> set[int]:
    return set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)


def generate_batch(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Collection[int] | None = None,
    batch_size: int = 8,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy new token ids for every prompt, up to ``batch_size`` rows decoding together.

    Row i equals ``list(generate_tokens(model, prompts[i], temperature=0, ...))`` (the stop
    token not included): the prompts run through ``inference.engine.Engine``, whose rows are
    left-padded in a shared cache with their own positions (continuous batching: a row that
    stops makes room for the next prompt at once; tests/test_generate.py and
    tests/inference/test_engine.py check the tokens). A prompt whose length +
    ``max_new_tokens`` exceeds the context runs alone through ``generate_tokens``: its window
    slides, which a shared batch cannot do; so does every prompt with ``use_cache=False``
    (the reference path). Greedy only (scoring): sampled requests go to the engine directly.
    """
    from lmforge.inference.engine import Engine, Request  # the engine builds on this module

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) >= 1")
    rows = [[int(t) for t in p] for p in prompts]
    if any(not r for r in rows):
        raise ValueError("an empty prompt: pass at least one token (the BOS id for no prompt)")
    L = model.cfg.context_length
    out: list[list[int]] = [[] for _ in rows]
    fits = sorted(
        (i for i, r in enumerate(rows) if use_cache and len(r) + max_new_tokens <= L),
        key=lambda i: len(rows[i]),
    )  # neighbours of similar length: little padding
    for i in sorted(set(range(len(rows))) - set(fits)):
        kw = dict(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos_id)
        out[i] = list(generate_tokens(model, rows[i], use_cache=use_cache, **kw))  # type: ignore[arg-type]
    if fits:
        greedy = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None)
        stop = frozenset(_stop_set(eos_id))
        # Cache columns for the longest prompt + the budget, not the whole context.
        width = max(len(rows[i]) for i in fits) + max_new_tokens
        engine = Engine(model, max_batch=batch_size, max_len=width)
        done = engine.run([Request(rows[i], greedy, stop_ids=stop) for i in fits])
        for i, c in zip(fits, done, strict=True):
            out[i] = c.token_ids
    return out


class StreamDecoder:
    """Token ids → new printable text, for streaming to a terminal.

    Byte-level BPE can split one UTF-8 character over several tokens; decoding such a prefix
    ends in U+FFFD, so output is held back until the character completes (or ``flush()``).
    Each step decodes a short window (as text-generation-inference does): ``ids[prefix:read]``
    is printed, whatever ``ids[prefix:]`` adds is new; decoding the printed tokens in front
    keeps decoders that strip a leading space right. ``context_ids`` (the prompt) are decoded
    as context, not printed. Special tokens are skipped; the output joins to ``decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self._ids = list(context_ids)[-4:]  # a few tokens of context suffice
        self._prefix, self._read = 0, len(self._ids)  # the context counts as printed
        self.ids: list[int] = []  # every id pushed

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the held-back text (an unfinished character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids, decode = self._ids, self.tokenizer.decode
        printed = decode(ids[self._prefix : self._read], skip_special_tokens=True)
        text = decode(ids[self._prefix :], skip_special_tokens=True)
        if not final and (len(text) <= len(printed) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(printed) :]


def generate_text(
    model: Decoder,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    bos_id: int | None,
    eos_id: int | Collection[int] | None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Continue ``prompt``; return the generated text (without the prompt).

    An empty prompt starts from ``bos_id``; otherwise the prompt is encoded as the tokenizer
    does. ``on_text`` receives each printable piece as soon as it is complete (for streaming).
    """
    if prompt:
        prompt_ids = tokenizer.encode(prompt).ids
    elif bos_id is not None:
        prompt_ids = [bos_id]
    else:
        raise ValueError("the prompt is empty and the tokenizer has no BOS token: give a prompt")
    return stream_text(model, tokenizer, prompt_ids, cfg, eos_id, on_text)


def stream_text(
    model: Decoder,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    cfg: SampleConfig,
    eos_id: int | Collection[int] | None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Continue ``prompt_ids``; return the new text, passing each printable piece to ``on_text``.

    Runs through ``inference.engine.Engine`` (one request) when prompt + ``max_new_tokens``
    fit the context; past it, or without the cache, through ``generate_tokens`` (whose window
    slides). Both give the same tokens (tests/inference/test_engine.py)."""
    stop = _stop_set(eos_id if cfg.stop_at_eos else None)
    pieces: list[str] = []

    def take(text: str) -> None:
        if text:
            pieces.append(text)
            if on_text is not None:
                on_text(text)

    if cfg.use_cache and len(prompt_ids) + cfg.max_new_tokens <= model.cfg.context_length:
        from lmforge.inference.engine import Engine, Request  # the engine builds on this module

        engine = Engine(model, tokenizer, max_batch=1,
                        max_len=len(prompt_ids) + cfg.max_new_tokens)  # fmt: skip
        engine.submit(Request(prompt_ids, cfg, stop_ids=frozenset(stop)), lambda d: take(d.text))
        engine.drain()
        return "".join(pieces)
    tokens = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        seed=cfg.seed,
        use_cache=cfg.use_cache,
        eos_id=stop,
    )
    stream = StreamDecoder(tokenizer, context_ids=prompt_ids)
    for token in chain(tokens, [None]):  # None marks the end: flush the held-back text
        take(stream.flush() if token is None else stream.push(token))
    return "".join(pieces)
