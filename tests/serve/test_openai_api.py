"""``lmforge serve`` through the official ``openai`` client: every answer equals the same
request decoded alone by ``generate_tokens`` (the reference path), streamed or not, alone or
beside 15 other clients."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from tests.serve.conftest import Live, start

from lmforge.checkpoint.load import load
from lmforge.data.chat_template import ChatFormat
from lmforge.generate import generate_tokens
from lmforge.recipes.serve import ServeConfig


def client(live: Live, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=60, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def ref(live: Live):
    model, tok, manifest = load(live.checkpoint)
    fmt = ChatFormat.for_checkpoint(manifest.path, tok)
    return model, tok, fmt, fmt.stop_ids(manifest.path)


def reference(ref, prompt_ids: list[int], n: int, temperature: float = 0.0, seed: int = 0) -> str:
    model, tok, _, stop = ref
    ids = list(generate_tokens(model, prompt_ids, max_new_tokens=n, temperature=temperature,
                               top_k=None, seed=seed, eos_id=stop))  # fmt: skip
    return tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)) :], len(ids)


def test_models_lists_the_checkpoint_folder_name(live: Live) -> None:
    models = client(live).models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    assert client(live).models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client(live).models.retrieve("gpt-4")


@pytest.mark.parametrize("model", ["tiny-chat", "default"])
def test_completion_equals_the_reference(live: Live, ref, model: str) -> None:
    out = client(live).completions.create(model=model, prompt="The cat", max_tokens=12,
                                          temperature=0)  # fmt: skip
    ids = ref[1].encode("The cat").ids
    text, n = reference(ref, ids, 12)
    assert out.choices[0].text == text
    assert out.model == "tiny-chat" and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == n
    assert out.usage.total_tokens == len(ids) + n
    assert out.choices[0].finish_reason == ("length" if n == 12 else "stop")


def test_chat_uses_the_template_and_streams_the_same_text(live: Live, ref) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    kw = dict(model="default", messages=messages, max_tokens=20, temperature=0.9, seed=11)
    whole = client(live).chat.completions.create(**kw)
    ids = ref[2].prompt_ids(messages)
    text, n = reference(ref, ids, 20, temperature=0.9, seed=11)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == n
    chunks = list(client(live).chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_is_openai_sse_and_ends_with_done(live: Live) -> None:
    body = {"model": "default", "prompt": "The dog", "max_tokens": 8, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {"id", "object", "created", "model", "choices"} <= events[0].keys()


def test_n_choices_and_stop_strings(live: Live, ref) -> None:
    kw = dict(model="default", prompt="A bird", max_tokens=40, temperature=1.0, seed=3)
    free = client(live).completions.create(**kw).choices[0].text
    stop = next(free[i : i + 3] for i in range(8, 30)
                if free[i : i + 3].strip() and "\ufffd" not in free[i : i + 3])  # fmt: skip
    out = client(live).completions.create(stop=[stop, "\x00"], **kw)
    assert out.choices[0].text == free[: free.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    greedy = client(live).completions.create(model="default", prompt="A bird", max_tokens=9,
                                             temperature=0, n=2)  # fmt: skip
    assert greedy.choices[0].text == greedy.choices[1].text
    assert [c.index for c in greedy.choices] == [0, 1]
    seeded = client(live).completions.create(n=3, **kw)
    assert seeded.choices[0].text == free  # choice 0 draws with the seed itself
    assert len({c.text for c in seeded.choices}) > 1  # choice i draws with seed + i


def test_logprobs(live: Live, ref) -> None:
    out = client(live).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for lp in content:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)  # greedy: the likeliest


# ---- errors -------------------------------------------------------------------------------------


def test_errors_use_openai_bodies(live: Live) -> None:
    c = client(live)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="default", prompt="The cat " * 400, max_tokens=500)
    assert e.value.code == "context_length_exceeded" and "1024" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="default", prompt="x", temperature=7)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="default", prompt="x", presence_penalty=1.0)
    assert "presence_penalty" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="default", input="x")
    assert "encoder" in e.value.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"model": "default", "prompt": "x", "max_tokens": 5', None),  # cut short
        ('{"model": "default", "prompt": "x", "max_tokens": "five"}', "max_tokens"),
        ('{"model": "default", "prompt": "x", "temprature": 0}', "temprature"),
        ('{"model": "default"}', "prompt"),
        ('{"model": "default", "messages": [{"role": "robot", "content": "x"}]}', "messages"),
    ],
)
def test_malformed_requests_name_the_field(live: Live, body: str, field: str | None) -> None:
    url = live.url + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
    r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    if field is None:
        assert "not valid JSON" in error["message"]
    else:
        assert error["param"].startswith(field) and field in error["message"]


def test_api_key_is_required_when_set(tiny_ckpt) -> None:
    server, thread, url, _ = start(ServeConfig(checkpoint=str(tiny_ckpt), api_key="s3cret"))
    try:
        live = Live(url, None, tiny_ckpt)
        with pytest.raises(openai.AuthenticationError):
            client(live, api_key="wrong").models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert client(live, api_key="s3cret").models.list().data[0].id == "tiny-chat"
        assert httpx.get(url + "/health").json() == {"status": "ok"}  # probes stay open
        # CORS is off unless asked: no Access-Control header for a browser's origin
        r = httpx.get(url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        server.should_exit = True
        thread.join(10)


def test_full_queue_is_429(tiny_ckpt) -> None:
    server, thread, url, app = start(
        ServeConfig(checkpoint=str(tiny_ckpt), max_batch=1, max_queue=0)
    )
    app.state.engine.on_step = lambda active, waiting: time.sleep(0.02)  # a slow model
    try:
        body = {
            "model": "default",
            "prompt": "The",
            "max_tokens": 900,
            "stream": True,
            "temperature": 0,
        }  # greedy: no early end of text by chance
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            assert app.state.engine.active == 1  # the one slot is taken, no room to wait
            with pytest.raises(openai.RateLimitError) as e:
                client(Live(url, app, tiny_ckpt)).completions.create(model="default", prompt="x")
            assert "busy" in e.value.message
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_client_that_leaves_cancels_its_generation(live: Live) -> None:
    engine = live.engine
    handles = []
    submit = engine.submit

    def recording(*a, **kw):
        handles.append(submit(*a, **kw))
        return handles[-1]

    engine.submit = recording
    try:
        body = {"model": "default", "prompt": "The", "max_tokens": 1000, "stream": True,
                "temperature": 1.0, "stop": ["\x00"]}  # fmt: skip
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break  # leave after a few chunks: the connection closes
        assert handles[0].done.wait(10), "the engine kept decoding a request nobody reads"
        steps = handles[0].steps
        time.sleep(0.2)
        assert handles[0].steps == steps < 1000
        assert handles[0].cancelled.is_set()
    finally:
        engine.submit = submit


def test_a_plain_request_whose_client_leaves_is_cancelled(live: Live) -> None:
    """Not streamed: the route polls for the disconnect while it waits."""
    engine = live.engine
    handles = []
    submit = engine.submit
    engine.submit = lambda *a, **kw: handles.append(submit(*a, **kw)) or handles[-1]
    engine.on_step = lambda active, waiting: time.sleep(0.01)  # 900 tokens: ≥ 9 s
    try:
        body = {"model": "default", "prompt": "The", "max_tokens": 900, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json=body, timeout=1.0)
        assert handles[0].done.wait(10), "the engine kept decoding a request nobody waits for"
        assert handles[0].cancelled.is_set() and handles[0].steps < 900
    finally:
        engine.submit, engine.on_step = submit, None


def test_health_and_metrics(live: Live) -> None:
    client(live).completions.create(model="default", prompt="The", max_tokens=3)
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    text = httpx.get(live.url + "/metrics").text
    for name in ("lmforge_requests_total", "lmforge_generation_tokens_total",
                 "lmforge_prompt_tokens_total", "lmforge_queue_depth",
                 "lmforge_running_requests", "lmforge_request_latency_seconds_bucket",
                 "lmforge_time_to_first_token_seconds_bucket"):  # fmt: skip
        assert name in text
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in text


# ---- 16 concurrent streams ----------------------------------------------------------------------

PROMPTS = ["The cat", "A dog ran", "Café", "你好", "The bird sang in", "emoji 🙂", "The park",
           "A", "The mat. The", "more text", "to learn", "merges from", "sat on", "in the tree",
           "naïve", "The dog ran to the park. A bird"]  # fmt: skip


def test_sixteen_concurrent_streams_each_equal_the_request_alone(live: Live) -> None:
    """Different prompts, lengths, seeds and temperatures at once (8 decode together, 8 wait
    and join as others leave); each stream equals the same request made alone."""
    requests = [dict(model="default", prompt=p, max_tokens=10 + 3 * i, seed=100 + i,
                     temperature=0.0 if i % 3 == 0 else 1.0) for i, p in enumerate(PROMPTS)]  # fmt: skip
    alone = [client(live).completions.create(**r).choices[0].text for r in requests]
    assert len(set(alone)) > 10

    async def stream(c: openai.AsyncOpenAI, r: dict) -> str:
        parts = []
        async for chunk in await c.completions.create(stream=True, **r):
            if chunk.choices:
                parts.append(chunk.choices[0].text)
        return "".join(parts)

    async def all_at_once() -> list[str]:
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(*(stream(c, r) for r in requests))
        finally:
            await c.close()

    assert asyncio.run(all_at_once()) == alone
    assert live.engine.active == 0
