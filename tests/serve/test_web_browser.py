"""The web page in a real browser (Debian's chromium driven by Playwright): the dashboard lists
runs and draws the newest run's curves without a click, follows a live run, compares two runs,
hides the chat when mounted without it; the chat playground streams a reply. Every page must
load without console errors. Skipped, with the reason printed, where no browser can start.

The helpers at the top (browser, server thread, "was the point drawn" check) are shared with
test_web_screenshots.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tests.serve.test_web_runs import train_events, write_run

from lmforge.recipes.dashboard import create_dashboard_app
from lmforge.serve.web import mount

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")


def find_chromium() -> str | None:
    """The system browser: $LMFORGE_CHROMIUM when set (and only it), else Debian's chromium on
    PATH. ``playwright install`` is never run: the tests use what the machine has."""
    chosen = os.environ.get("LMFORGE_CHROMIUM")
    for candidate in (chosen,) if chosen else CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path and Path(path).is_file():
            return path
    return None


@contextlib.contextmanager
def launch_browser() -> Iterator[Any]:
    """A headless chromium, or the test skipped with the reason printed (``-ra``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "browser tests: the playwright Python package is not installed (pip install -e '.[dev]')"
        )
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            f"browser tests: no chromium found ({os.environ.get('LMFORGE_CHROMIUM') or 'on PATH'}); "
            "apt-get install chromium (`make setup` tries it)"
        )
    pw = sync_playwright().start()
    try:
        try:
            browser = pw.chromium.launch(executable_path=exe)
        except Exception as e:  # a browser that cannot start here (no sandbox rights, libraries)
            pytest.skip(f"browser tests: {exe} did not start: {str(e).splitlines()[0]}")
        yield browser
        browser.close()
    finally:
        pw.stop()


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """``app`` on a free 127.0.0.1 port until the block ends; yields its base URL."""
    import uvicorn

    from lmforge.recipes.dashboard import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


class PageErrors(list):
    """Console errors and uncaught exceptions of a page, collected while it runs."""

    def attach(self, page: Any) -> None:
        page.on(
            "console",
            lambda m: self.append(f"console.{m.type}: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.append(f"uncaught: {e}"))


def open_page(browser: Any, url: str) -> tuple[Any, PageErrors]:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = PageErrors()
    errors.attach(page)
    page.goto(url)
    return page, errors


def wait_points(page: Any, chart: str, n: int, timeout_ms: int = 20_000) -> None:
    """Until chart ``chart`` holds ``n`` x values (the page polls every 2 s)."""
    page.wait_for_function(
        "([c, n]) => { const u = window.lmforge && window.lmforge.charts[c];"
        " return !!u && u.data[0].length === n; }",
        arg=[chart, n],
        timeout=timeout_ms,
    )


# For each of a series' points, whether a pixel of the series' colour lies within 3 canvas pixels
# of where uPlot puts the point: proves the line was drawn through the data, not just that a
# canvas exists (an empty or wrongly scaled chart fails it).
_DRAWN_JS = """async ([c, s]) => {
  const u = window.lmforge.charts[c];
  // the other series are hidden while looking (one may be drawn over this one where they meet)
  const others = u.series.map((_, j) => j).filter((j) => j > 0 && j !== s && u.series[j].show);
  for (const j of others) u.setSeries(j, { show: false });
  await new Promise((r) => setTimeout(r, 50)); // uPlot redraws in a microtask
  const canvas = u.ctx.canvas;
  const img = u.ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const hex = u.series[s].stroke();
  const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const near = (x, y) => {
    for (let dx = -3; dx <= 3; dx++) for (let dy = -3; dy <= 3; dy++) {
      const px = Math.round(x) + dx, py = Math.round(y) + dy;
      if (px < 0 || py < 0 || px >= canvas.width || py >= canvas.height) continue;
      const i = 4 * (py * canvas.width + px);
      if (Math.abs(img[i] - rgb[0]) + Math.abs(img[i + 1] - rgb[1]) + Math.abs(img[i + 2] - rgb[2]) < 90 && img[i + 3] > 200) return true;
    }
    return false;
  };
  const out = [];
  for (let i = 0; i < u.data[0].length; i++) {
    const y = u.data[s][i];
    if (y === null || y === undefined) continue;
    out.push(near(u.valToPos(u.data[0][i], "x", true), u.valToPos(y, "y", true)));
  }
  for (const j of others) u.setSeries(j, { show: true });
  return out;
}"""


def drawn(page: Any, chart: str, series: int) -> list[bool]:
    """Per data point of ``series`` in ``chart``: is it drawn where it belongs?"""
    return page.evaluate(_DRAWN_JS, [chart, series])


# ---- the tests ----


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_browser() as b:
        yield b


def losses(events: list[dict[str, Any]], key: str = "loss") -> tuple[list[int], list[float]]:
    pairs = [(e["step"], e[key]) for e in events if key in e]
    return [s for s, _ in pairs], [v for _, v in pairs]


def test_landing_lists_runs_and_draws_the_newest_without_a_click(
    browser: Any, tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    old = train_events(range(1, 31), start_loss=7.0)
    new = train_events(range(1, 41), start_loss=6.0)
    write_run(root / "pretrain-old", old, {"steps": 30}, mtime=time.time() - 7200)
    summary = {"steps": 40, "val_loss": 2.5, "sample_prompt": "ROMEO:", "sample": " What light"}
    write_run(root / "pretrain-new", new, summary)
    with serve_in_thread(create_dashboard_app(root)) as url:
        page, errors = open_page(browser, url)
        wait_points(page, "loss", 40)
        assert page.locator("#run-list a").all_inner_texts() == ["pretrain-new", "pretrain-old"]
        assert page.inner_text("#run-title") == "pretrain-new"
        data = page.evaluate("window.lmforge.charts.loss.data")
        steps, train = losses(new)
        assert data[0] == steps and data[1] == pytest.approx(train)
        val_steps, val = losses(new, "val_loss")
        assert [data[2][steps.index(s)] for s in val_steps] == pytest.approx(val)
        assert all(drawn(page, "loss", 1)) and all(drawn(page, "loss", 2))
        lr = page.evaluate("window.lmforge.charts.lr.data")
        assert lr[1] == pytest.approx(losses(new, "lr")[1]) and all(drawn(page, "lr", 1))
        assert "val_loss" in page.inner_text("#run-summary")
        assert "ROMEO: What light" in page.inner_text("#run-samples")
        assert page.inner_text("#run-doctor") == "No problems found."
        assert page.locator("#view-chat").is_hidden() and page.locator("#tab-chat").is_hidden()

        # a click shows the other run; the URL names it (a reload shows it again)
        page.click("text=pretrain-old")
        wait_points(page, "loss", 30)
        assert page.evaluate("window.lmforge.charts.loss.data[1]") == pytest.approx(losses(old)[1])
        assert all(drawn(page, "loss", 1))
        page.reload()
        wait_points(page, "loss", 30)
        assert page.inner_text("#run-title") == "pretrain-old"
        page.goto(url + "#chat")  # no chat on the dashboard: the runs view stays
        assert page.locator("#view-runs").is_visible() and page.locator("#view-chat").is_hidden()
        assert errors == []


def test_the_doctors_findings_are_shown_beside_a_run(browser: Any, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    events = train_events(range(1, 31))
    events.insert(20, {"step": 20, "skipped": "non-finite loss or gradient", "loss": None})
    write_run(root / "pretrain-nan", events, {"steps": 30})
    with serve_in_thread(create_dashboard_app(root)) as url:
        page, errors = open_page(browser, url)
        wait_points(page, "loss", 30)
        page.wait_for_selector("#run-doctor .finding.error")
        text = page.inner_text("#run-doctor")
        assert "error: nonfinite" in text and "steps 20" in text and "optim.lr" in text
        assert errors == []


def test_a_live_run_updates_the_chart(browser: Any, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    events = train_events(range(1, 6))
    run = write_run(root / "live", events)
    nxt = train_events(range(6, 13))
    lines = [json.dumps(e) + "\n" for e in nxt]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(lines[0][:20])  # the trainer is mid-line when the page first reads
    with serve_in_thread(create_dashboard_app(root)) as url:
        page, errors = open_page(browser, url)
        wait_points(page, "loss", 5)
        assert "live" in page.inner_text("#run-status")
        with open(run / "metrics.jsonl", "a") as f:
            f.write(lines[0][20:])
            f.writelines(lines[1:])
        steps = sorted({e["step"] for e in events + nxt})
        wait_points(page, "loss", len(steps))
        data = page.evaluate("window.lmforge.charts.loss.data")
        assert data[0] == steps
        assert data[1] == pytest.approx(losses(events + nxt)[1])
        assert all(drawn(page, "loss", 1))
        # a run started after the page opened appears in the list
        write_run(root / "another", train_events(range(1, 3)))
        page.wait_for_selector("#run-list a[data-run='another']", timeout=20_000)
        assert errors == []


def test_compare_two_runs_on_one_chart(browser: Any, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    a = train_events(range(1, 31), lr=3e-3, start_loss=6.5)
    b = train_events(range(1, 21), lr=1e-3, start_loss=7.5)
    write_run(root / "lr-3e-3", a, {"steps": 30}, mtime=time.time() - 10)
    write_run(root / "lr-1e-3", b, {"steps": 20}, mtime=time.time() - 20)
    with serve_in_thread(create_dashboard_app(root)) as url:
        page, errors = open_page(browser, url + "#compare")
        wait_points(page, "compare", 30)
        labels = page.evaluate("window.lmforge.charts.compare.series.map((s) => s.label)")
        assert labels[1:] == [
            "lr-3e-3 loss",
            "lr-1e-3 loss",
            "lr-3e-3 val_loss",
            "lr-1e-3 val_loss",
        ]
        data = page.evaluate("window.lmforge.charts.compare.data")
        assert data[0] == list(range(1, 31))
        assert data[1] == pytest.approx(losses(a)[1])
        assert data[2][:20] == pytest.approx(losses(b)[1]) and data[2][20:] == [None] * 10
        for series in (1, 2, 3, 4):
            assert all(drawn(page, "compare", series)), series
        page.select_option("#compare-metric", "lr")
        page.wait_for_function("window.lmforge.charts.compare.series[1].label === 'lr-3e-3 lr'")
        data = page.evaluate("window.lmforge.charts.compare.data")
        assert data[1] == pytest.approx(losses(a, "lr")[1])
        assert data[2][:20] == pytest.approx(losses(b, "lr")[1])
        assert errors == []


def fake_openai_app(seen: list[dict[str, Any]], api_key: str | None) -> FastAPI:
    """A stand-in for ``lmforge serve``'s OpenAI routes (same SSE chunk format), slow enough
    between chunks that the page visibly streams."""
    app = FastAPI()

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        if not authorized(request):
            return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        if not authorized(request):
            return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
        pieces = ["You ", "said: ", *body["messages"][-1]["content"].split(" ")[:1], " — ok"]

        async def events() -> Any:
            for piece in pieces:
                delta = {
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]
                }
                yield f"data: {json.dumps(delta)}\n\n"
                await asyncio.sleep(0.15)
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    mount(app, runs_dir=None, chat=True)
    return app


_RECORD_JS = """() => {
  window.snapshots = [];
  new MutationObserver(() => {
    const last = [...document.querySelectorAll('.msg.assistant')].pop();
    if (last) window.snapshots.push(last.textContent);
  }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_a_reply_with_the_sampling_controls(browser: Any) -> None:
    seen: list[dict[str, Any]] = []
    with serve_in_thread(fake_openai_app(seen, api_key="k-123")) as url:
        page, errors = open_page(browser, url)
        # no runs_dir: the chat is the page (the script picks the view after load: wait for it;
        # an immediate check failed once on a loaded machine)
        page.wait_for_selector("#view-chat", state="visible")
        assert page.locator("#tab-runs").is_hidden()
        page.wait_for_selector("#chat-error:not([hidden])")  # /v1/models wants the key
        assert "API key" in page.inner_text("#chat-error")
        # the browser itself logs the refused request; nothing else may be logged
        assert len(errors) == 1 and "401 (Unauthorized)" in errors[0], errors
        errors.clear()
        page.fill("#chat-api-key", "k-123")
        page.dispatch_event("#chat-api-key", "change")
        page.wait_for_function("document.querySelector('#chat-model').value === 'tiny-chat'")
        page.fill("#chat-system", "Be brief.")
        page.fill("#chat-temperature", "0.3")
        page.fill("#chat-top-p", "0.9")
        page.fill("#chat-max-tokens", "32")
        page.fill("#chat-seed", "7")
        page.evaluate(_RECORD_JS)
        page.fill("#chat-input", "hello there")
        page.press("#chat-input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=20_000)
        reply = page.inner_text(".msg.assistant")
        assert reply == "You said: hello — ok"
        shown = [s for s in page.evaluate("window.snapshots") if s]
        partial = sorted({s for s in shown if s != reply}, key=len)
        assert len(partial) >= 2 and all(reply.startswith(p) for p in partial), shown  # streamed
        assert page.inner_text("#chat-error") == "" or page.locator("#chat-error").is_hidden()
        req = seen[-1]
        assert req["authorization"] == "Bearer k-123"
        assert req["body"]["stream"] is True and req["body"]["model"] == "tiny-chat"
        assert (req["body"]["temperature"], req["body"]["top_p"]) == (0.3, 0.9)
        assert (req["body"]["max_tokens"], req["body"]["seed"]) == (32, 7)
        assert req["body"]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"},
        ]

        # the second turn carries the history; a bad field sends nothing and says why
        page.fill("#chat-input", "again")
        page.press("#chat-input", "Enter")
        page.wait_for_function(
            "document.querySelectorAll(\".msg.assistant[data-done='true']\").length === 2"
        )
        assert [m["role"] for m in seen[-1]["body"]["messages"]] == [
            "system",
            "user",
            "assistant",
            "user",
        ]
        assert seen[-1]["body"]["messages"][2]["content"] == reply
        n = len(seen)
        page.fill("#chat-temperature", "-1")
        page.fill("#chat-input", "third")
        page.press("#chat-input", "Enter")
        page.wait_for_selector("#chat-error:not([hidden])")
        assert "temperature must be a number from 0 to 2" in page.inner_text("#chat-error")
        assert len(seen) == n
        assert errors == [], errors


def test_chat_page_on_the_real_lmforge_serve(browser: Any, tiny_ckpt: Path, tmp_path: Path) -> None:
    """``lmforge serve --checkpoint CKPT --runs_dir DIR --api_key KEY``'s page: the dashboard
    and the chat together; the reply the page assembles from the stream equals the server's
    non-streamed reply to the same request."""
    import httpx
    from tests.serve.conftest import start

    from lmforge.recipes.serve import ServeConfig

    root = tmp_path / "runs"
    write_run(root / "pretrain-1", train_events(range(1, 21)), {"steps": 20})
    cfg = ServeConfig(checkpoint=str(tiny_ckpt), runs_dir=str(root), api_key="k-9", max_batch=2)
    server, thread, url, _ = start(cfg)
    try:
        page, errors = open_page(browser, url + "/")
        wait_points(page, "loss", 20)  # the landing page is the dashboard here
        assert page.locator("#tab-chat").is_visible()
        page.click("#tab-chat")
        page.wait_for_selector("#chat-error:not([hidden])")  # /v1/models needs the key
        assert len(errors) == 1 and "401 (Unauthorized)" in errors[0], errors
        errors.clear()
        page.fill("#chat-api-key", "k-9")
        page.dispatch_event("#chat-api-key", "change")
        page.wait_for_function("document.querySelector('#chat-model').value !== ''")
        model = page.input_value("#chat-model")
        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "24")
        page.fill("#chat-input", "The cat")
        page.press("#chat-input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        reply = page.evaluate("document.querySelector('.msg.assistant').textContent")
        chunks = int(page.inner_text("#chat-stats").split()[0])
        assert chunks >= 2 and reply.strip(), (chunks, reply)  # streamed, piece by piece
        same = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": "Bearer k-9"},
            json={
                "model": model,
                "messages": [{"role": "user", "content": "The cat"}],
                "temperature": 0,
                "top_p": 1,
                "max_tokens": 24,
            },  # fmt: skip
            timeout=60,
        ).json()
        assert reply == same["choices"][0]["message"]["content"]
        assert errors == []
    finally:
        server.should_exit = True
        thread.join(10)
