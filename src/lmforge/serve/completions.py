"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI requests → engine requests →
OpenAI responses, whole or streamed as server-sent events in OpenAI's chunk format.

The engine decodes in its own thread; each request's deltas cross into the event loop
through an ``asyncio.Queue`` (``EngineStream``). A client that goes away cancels its
requests: a stream when Starlette stops iterating it, a plain request when
``Request.is_disconnected`` says so (polled while waiting).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HttpRequest
from tokenizers import Tokenizer

from lmforge.data.chat_template import ChatFormat
from lmforge.generate import SampleConfig
from lmforge.inference import engine as eng
from lmforge.serve import openai_schema as oa
from lmforge.serve.metrics import Metrics


class ApiError(Exception):
    """An error for the client, sent as OpenAI's error body with ``status``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_exceeded", 503: "service_unavailable"}.get(
                    self.status, "invalid_request_error")  # fmt: skip


@dataclass
class Generator:
    """What the completion routes need: the engine, the tokenizer and how to render chats."""

    engine: eng.Engine
    tokenizer: Tokenizer
    chat: ChatFormat
    stop_ids: frozenset[int]
    model_id: str
    metrics: Metrics
    seeds: Any = field(default_factory=lambda: secrets.SystemRandom())


class EngineStream:
    """The deltas of several engine requests as ``(choice index, Delta)``, in the event loop."""

    def __init__(self, engine: eng.Engine, requests: Sequence[eng.Request]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, eng.Delta]] = asyncio.Queue()
        self.handles: list[eng.Handle] = []
        try:
            for i, r in enumerate(requests):
                self.handles.append(engine.submit(r, self._sender(loop, i)))
        except eng.QueueFull as e:
            self.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry later") from None

    def _sender(self, loop: asyncio.AbstractEventLoop, i: int) -> Callable[[eng.Delta], None]:
        def put(delta: eng.Delta) -> None:  # called in the engine's thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, delta))
            except RuntimeError:  # the event loop has closed (server shutting down)
                self.cancel()

        return put

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, eng.Delta]]:
        left = len(self.handles)
        while left:
            i, delta = await self.queue.get()
            left -= delta.finish_reason is not None
            yield i, delta


def _check_model(g: Generator, name: str) -> None:
    if name not in (g.model_id, "default"):
        raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                       f"`{g.model_id}` (or say `default`)", "model", "model_not_found")  # fmt: skip


def _requests(
    g: Generator, body: oa._Sampling, prompts: list[list[int]], max_tokens: int | None,
    logprobs: int | None,
) -> list[eng.Request]:  # fmt: skip
    """One engine request per prompt and choice (``n``); choice i of a seeded request draws
    with seed + i, so choices differ and each is reproducible."""
    out = []
    for ids in prompts:
        budget = max_tokens if max_tokens is not None else g.engine.max_len - len(ids)
        if len(ids) + budget > g.engine.max_len or budget < 1:
            raise ApiError(400, f"This model's maximum context length is {g.engine.max_len} "
                           f"tokens; the prompt has {len(ids)} and max_tokens asks for "
                           f"{budget}: shorten the prompt or lower max_tokens",
                           "max_tokens" if max_tokens else "messages",
                           "context_length_exceeded")  # fmt: skip
        for i in range(body.n):
            seed = body.seed + i if body.seed is not None else g.seeds.randrange(2**63)
            sample = SampleConfig(max_new_tokens=budget, temperature=body.temperature,
                                  top_k=body.top_k, top_p=body.top_p if body.top_p < 1 else None,
                                  repetition_penalty=body.repetition_penalty, seed=seed)  # fmt: skip
            out.append(eng.Request(ids, sample, tuple(body.stop_list), g.stop_ids, logprobs))
    return out


def _usage(prompts: list[list[int]], tokens: int) -> oa.Usage:
    n = sum(len(p) for p in prompts)
    return oa.Usage(prompt_tokens=n, completion_tokens=tokens, total_tokens=n + tokens)


async def _collect(g: Generator, stream: EngineStream, http: HttpRequest) -> list[list[eng.Delta]]:
    """Every delta of every choice; the client leaving cancels the requests."""
    out: list[list[eng.Delta]] = [[] for _ in stream.handles]

    async def gather() -> None:
        async for i, d in _observed(g, stream):
            out[i].append(d)

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and await http.is_disconnected():
            stream.cancel()
            task.cancel()
            raise ApiError(499, "client closed the request")
    task.result()
    return out


async def _observed(g: Generator, stream: EngineStream) -> AsyncIterator[tuple[int, eng.Delta]]:
    """The stream, with tokens counted and time to first token / between tokens measured."""
    start = time.perf_counter()
    last: dict[int, float] = {}
    async for i, d in stream:
        now = time.perf_counter()
        if d.token_ids:
            g.metrics.generation_tokens.inc(len(d.token_ids))
            if i in last:
                g.metrics.inter_token_latency.observe((now - last[i]) / len(d.token_ids))
            elif not last:
                g.metrics.time_to_first_token.observe(now - start)
            last[i] = now
        if d.finish_reason == "error":
            raise ApiError(500, "generation failed on the server; see its log")
        yield i, d


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish(reason: str | None) -> str | None:
    return "length" if reason == "length" else "stop" if reason else None


# ---- /v1/completions ----------------------------------------------------------------------------


def completion_prompts(g: Generator, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = g.tokenizer.get_vocab_size()
    out = []
    for p in prompt:
        ids = g.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        if not ids:
            raise ApiError(400, "prompt: empty; give some text", "prompt")
        out.append(ids)
    return out


def _completion_logprobs(g: Generator, lps: list[eng.TokenLogprob]) -> oa.CompletionLogprobs:
    tok = g.tokenizer
    tokens = [tok.decode([lp.token_id]) for lp in lps]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return oa.CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{tok.decode([t]): v for t, v in lp.top} for lp in lps],
        text_offset=offsets,
    )


async def completions(g: Generator, body: oa.CompletionRequest, http: HttpRequest) -> Any:
    _check_model(g, body.model)
    prompts = completion_prompts(g, body.prompt)
    reqs = _requests(g, body, prompts, body.max_tokens, body.logprobs)
    g.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stream = EngineStream(g.engine, reqs)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            tokens = 0
            try:
                async for i, d in _observed(g, stream):
                    tokens += len(d.token_ids)
                    if not d.text and d.finish_reason is None:
                        continue
                    lp = _completion_logprobs(g, d.logprobs) if d.logprobs is not None else None
                    choice = oa.CompletionChoice(index=i, text=d.text, logprobs=lp,
                                                 finish_reason=_finish(d.finish_reason))  # fmt: skip
                    chunk = oa.Completion(
                        id=rid, created=created, model=g.model_id, choices=[choice]
                    )
                    yield _sse(chunk.model_dump(exclude={"usage"}))
                if usage:
                    chunk = oa.Completion(id=rid, created=created, model=g.model_id, choices=[],
                                          usage=_usage(prompts, tokens))  # fmt: skip
                    yield _sse(chunk.model_dump())
            except ApiError as e:
                yield _sse(oa.error_body(e.message, e.type, e.param, e.code))
            finally:
                stream.cancel()  # the client left (or all finished: then a no-op)
            yield _sse("[DONE]")

        return events()
    deltas = await _collect(g, stream, http)
    choices = []
    for i, ds in enumerate(deltas):
        lps = [lp for d in ds for lp in d.logprobs or []]
        choices.append(oa.CompletionChoice(
            index=i, text="".join(d.text for d in ds),
            logprobs=_completion_logprobs(g, lps) if body.logprobs is not None else None,
            finish_reason=_finish(ds[-1].finish_reason)))  # fmt: skip
    tokens = sum(len(d.token_ids) for ds in deltas for d in ds)
    return oa.Completion(id=rid, created=created, model=g.model_id, choices=choices,
                         usage=_usage(prompts, tokens))  # fmt: skip


# ---- /v1/chat/completions -----------------------------------------------------------------------


def _chat_logprobs(g: Generator, lps: list[eng.TokenLogprob], top: bool) -> oa.ChoiceLogprobs:
    def entry(t: int, v: float) -> oa.TopLogprob:
        s = g.tokenizer.decode([t])
        return oa.TopLogprob(token=s, logprob=v, bytes=list(s.encode()))

    content = []
    for lp in lps:
        e = entry(lp.token_id, lp.logprob)
        alts = [entry(t, v) for t, v in lp.top] if top else []
        content.append(oa.TokenLogprob(**e.model_dump(), top_logprobs=alts))
    return oa.ChoiceLogprobs(content=content)


async def chat_completions(g: Generator, body: oa.ChatCompletionRequest, http: HttpRequest) -> Any:
    _check_model(g, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in body.messages]  # fmt: skip
    try:
        ids = g.chat.prompt_ids(messages)  # type: ignore[arg-type]
    except Exception as e:  # a template that raises (e.g. roles out of order) is the client's
        raise ApiError(400, f"messages: the chat template refused them: {e}", "messages") from e
    prompts = [ids]
    max_tokens = body.max_completion_tokens or body.max_tokens
    want = (body.top_logprobs or 0) if body.logprobs else None
    reqs = _requests(g, body, prompts, max_tokens, want)
    g.metrics.prompt_tokens.inc(len(ids))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream = EngineStream(g.engine, reqs)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(choices: list[oa.ChunkChoice], use: oa.Usage | None = None) -> str:
            c = oa.ChatCompletionChunk(id=rid, created=created, model=g.model_id,
                                       choices=choices, usage=use).model_dump()  # fmt: skip
            for ch in c["choices"]:  # OpenAI's deltas carry only the keys that change
                ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
            if use is None:
                del c["usage"]
            return _sse(c)

        async def events() -> AsyncIterator[str]:
            tokens = 0
            try:
                for i in range(len(reqs)):  # OpenAI's first chunk: the role, empty content
                    yield chunk(
                        [oa.ChunkChoice(index=i, delta=oa.ChunkDelta(role="assistant", content=""))]
                    )
                async for i, d in _observed(g, stream):
                    tokens += len(d.token_ids)
                    lp = _chat_logprobs(g, d.logprobs, bool(want)) if d.logprobs else None
                    if d.text or lp is not None:
                        delta = oa.ChunkDelta(content=d.text)
                        yield chunk([oa.ChunkChoice(index=i, delta=delta, logprobs=lp)])
                    if d.finish_reason is not None:
                        done = oa.ChunkChoice(index=i, delta=oa.ChunkDelta(),
                                              finish_reason=_finish(d.finish_reason))  # fmt: skip
                        yield chunk([done])
                if usage:
                    yield chunk([], _usage(prompts, tokens))
            except ApiError as e:
                yield _sse(oa.error_body(e.message, e.type, e.param, e.code))
            finally:
                stream.cancel()
            yield _sse("[DONE]")

        return events()
    deltas = await _collect(g, stream, http)
    choices = []
    for i, ds in enumerate(deltas):
        lps = [lp for d in ds for lp in d.logprobs or []]
        choices.append(oa.ChatChoice(
            index=i, message=oa.AssistantMessage(content="".join(d.text for d in ds)),
            logprobs=_chat_logprobs(g, lps, bool(want)) if want is not None else None,
            finish_reason=_finish(ds[-1].finish_reason)))  # fmt: skip
    tokens = sum(len(d.token_ids) for ds in deltas for d in ds)
    return oa.ChatCompletion(id=rid, created=created, model=g.model_id, choices=choices,
                             usage=_usage(prompts, tokens))  # fmt: skip
