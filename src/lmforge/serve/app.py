"""The OpenAI-compatible HTTP app: ``create_app(model, tokenizer, ...)`` → a FastAPI app.

    GET  /v1/models             the one model: its id is the checkpoint's folder name
    POST /v1/completions        text in, text out (decoders)
    POST /v1/chat/completions   messages rendered with the checkpoint's chat template
    POST /v1/embeddings         mean-pooled, L2-normalised encoder states (BERT checkpoints)
    GET  /health                200 {"status": "ok"} once the model is loaded
    GET  /metrics               Prometheus text: requests, tokens, queue depth, latencies

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``). With an API
key, every /v1 route needs ``Authorization: Bearer KEY`` (401 otherwise); /health and
/metrics stay open for probes. CORS is off unless origins are given. The engine is created
here and runs in its own thread while the app lives (lifespan).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.chat_template import ChatFormat
from lmforge.eval.mode import eval_mode
from lmforge.inference.engine import Engine
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder, mean_pool
from lmforge.serve import completions as routes
from lmforge.serve import openai_schema as oa
from lmforge.serve.completions import ApiError, Generator
from lmforge.serve.metrics import Metrics, new_metrics
from lmforge.serve.web import mount


def create_app(
    model: nn.Module,
    tokenizer: Tokenizer,
    model_id: str,
    *,
    chat: ChatFormat | None = None,
    stop_ids: Sequence[int] = (),
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    runs_dir: Path | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_len: int | None = None,
    engine_thread: bool = True,
) -> FastAPI:
    """The app serving ``model`` as ``model_id``. A ``Decoder`` gets the completion routes
    (``chat``: its template, default ChatML; ``stop_ids``: the ids that end a reply); an
    ``Encoder`` (or a model holding one as ``.encoder``) gets /v1/embeddings."""
    created = int(time.time())
    engine: Engine | None = None
    encoder: Encoder | None = None
    if isinstance(model, Decoder):
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                        max_len=max_len)  # fmt: skip
    else:
        encoder = model if isinstance(model, Encoder) else getattr(model, "encoder", None)
        if not isinstance(encoder, Encoder):
            raise TypeError(f"cannot serve a {type(model).__name__}: a Decoder or an encoder")
    metrics = new_metrics(engine)
    gen = None
    if engine is not None:
        gen = Generator(engine, tokenizer, chat or ChatFormat.chatml(tokenizer),
                        frozenset(stop_ids), model_id, metrics)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None and engine_thread:
            engine.start()  # else the caller runs engine.loop() (lmforge serve: main thread)
        try:
            yield
        finally:
            if engine is not None:
                engine.stop()  # also ends a loop() the caller runs

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.model_id = engine, model_id
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["*"], allow_headers=["*"])  # fmt: skip
    _add_error_handlers(app, metrics)
    auth = [Depends(_auth(api_key))]

    def decoder_only() -> Generator:
        if gen is None:
            raise ApiError(400, f"`{model_id}` is an encoder: it serves /v1/embeddings only",
                           "model", "model_not_supported")  # fmt: skip
        return gen

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> oa.ModelList:
        return oa.ModelList(data=[oa.Model(id=model_id, created=created)])

    @app.get("/v1/models/{name}", dependencies=auth)
    async def one_model(name: str) -> oa.Model:
        if name not in (model_id, "default"):
            raise ApiError(404, f"The model `{name}` does not exist", "model", "model_not_found")
        return oa.Model(id=model_id, created=created)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: oa.CompletionRequest, request: Request) -> Any:
        return await _timed(metrics, "completions", body.stream,
                            routes.completions(decoder_only(), body, request))  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Any:
        return await _timed(metrics, "chat", body.stream,
                            routes.chat_completions(decoder_only(), body, request))  # fmt: skip

    lock = asyncio.Lock()  # one encoder forward at a time (torch shares the cores anyway)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: oa.EmbeddingRequest) -> oa.EmbeddingList:
        if body.model not in (model_id, "default"):
            raise ApiError(404, f"The model `{body.model}` does not exist", "model",
                           "model_not_found")  # fmt: skip
        if encoder is None:
            raise ApiError(400, f"`{model_id}` is a decoder; /v1/embeddings needs an encoder "
                           "(BERT) checkpoint", "model", "model_not_supported")  # fmt: skip
        rows = _embedding_inputs(tokenizer, body.input, encoder.cfg.context_length)
        async with lock:
            vectors = await asyncio.to_thread(_embed, encoder, rows)
        data = []
        for i, v in enumerate(vectors):
            value: list[float] | str = v.tolist()
            if body.encoding_format == "base64":  # what the openai client asks for by default
                value = base64.b64encode(v.astype("<f4").tobytes()).decode()
            data.append(oa.Embedding(index=i, embedding=value))
        n = sum(len(r) for r in rows)
        metrics.prompt_tokens.inc(n)
        return oa.EmbeddingList(data=data, model=model_id,
                                usage=oa.Usage(prompt_tokens=n, total_tokens=n))  # fmt: skip

    # the page at /: chat playground (a decoder is served) + run dashboard (--runs_dir)
    mount(app, runs_dir=runs_dir, chat=gen is not None)
    return app


async def _timed(metrics: Metrics, endpoint: str, stream: bool, work: Any) -> Any:
    """Run a completion route; a stream becomes an SSE response whose end is timed."""
    start = time.perf_counter()
    out = await work
    if not stream:
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return out

    async def timed() -> AsyncIterator[str]:
        try:
            async for event in out:
                yield event
        finally:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    return StreamingResponse(timed(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


def _auth(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer "
                           "KEY` with the key the server was started with (--api_key)",
                           None, "invalid_api_key")  # fmt: skip

    return check


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(oa.error_body(e.message, e.type, e.param, e.code), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        # pydantic names the union member it tried last ("content.str"): not a field
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_name(p)]
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {msg}", None
        else:
            param = ".".join(loc) or None
            if param is None and ":" in msg:  # our validators start with the field's name
                param = msg.split(":", 1)[0]
            message = msg if param and msg.startswith(param) else f"{param or 'body'}: {msg}"
            if first.get("type") == "extra_forbidden":
                message = f"{param}: unknown field (check its spelling against OpenAI's API)"
        return JSONResponse(oa.error_body(message, "invalid_request_error", param), 400)

    app.add_middleware(_CountRequests, metrics=metrics)


class _CountRequests:
    """Counts requests by path and status. Plain ASGI, not ``@app.middleware("http")``:
    Starlette's BaseHTTPMiddleware wraps streamed bodies and hides a client's disconnect
    from the route, which must see it to cancel the generation."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sent(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        if path.startswith("/v1/models/"):  # one label, not one per name asked for
            path = "/v1/models/{name}"
        known = path.startswith("/v1/") or path in ("/health", "/metrics")
        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.requests.labels(path if known else "other", str(status)).inc()


def _is_type_name(part: object) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _embedding_inputs(tokenizer: Tokenizer, given: Any, context: int) -> list[list[int]]:
    items = [given] if isinstance(given, str) else given
    if items and isinstance(items[0], int):
        items = [items]
    rows = []
    for x in items:
        if isinstance(x, str):  # a tokenizer.json may pad: keep the real tokens only
            e = tokenizer.encode(x)
            rows.append([t for t, m in zip(e.ids, e.attention_mask, strict=True) if m])
        else:
            rows.append(list(x))
    for i, r in enumerate(rows):
        if not r or len(r) > context:
            raise ApiError(400, f"input[{i}] has {len(r)} tokens; this model takes 1 to "
                           f"{context}", "input", "context_length_exceeded")  # fmt: skip
    return rows


def _embed(encoder: Encoder, rows: list[list[int]]) -> list[np.ndarray]:
    """Mean of the real tokens' last states, L2-normalised (sentence-transformers' recipe for
    MiniLM-style models), one padded batch."""
    device = next(encoder.parameters()).device
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    with eval_mode(encoder, inference=True):
        hidden = encoder(ids.to(device), attention_mask=mask.to(device))  # (B, T, C)
        pooled = torch.nn.functional.normalize(mean_pool(hidden, mask.to(device)).float(), dim=-1)
    return list(pooled.cpu().numpy())
