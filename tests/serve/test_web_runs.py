"""The dashboard's reading of run folders and its JSON API, without a browser: listing, a live
``metrics.jsonl`` read incrementally (half-written last line, resume rewrite, damaged lines,
NaN), summaries and samples, and that nothing outside the runs folder is ever served."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmforge.atomic import atomic_write_text
from lmforge.errors import ConfigError
from lmforge.recipes.dashboard import bind, create_dashboard_app
from lmforge.serve.web import check_runs_dir, mount
from lmforge.serve.web.run_folders import list_runs, read_metrics_chunk, run_folder
from lmforge.train.metrics_log import MetricsLog, read_metrics

REPO = Path(__file__).resolve().parents[2]


def train_events(steps: range, lr: float = 2e-3, start_loss: float = 6.9) -> list[dict[str, Any]]:
    """Events shaped like ``fit``'s (train/loop.py): a train event every step, val every 10."""
    out: list[dict[str, Any]] = []
    for s in steps:
        out.append({"step": s, "loss": start_loss * 0.97**s, "lr": lr * (1 - s / 200),
                    "grad_norm": 0.5 + 0.01 * s, "tokens_per_s": 1000.0 + s})  # fmt: skip
        if s % 10 == 0:
            out.append({"step": s, "val_loss": start_loss * 0.975**s, "val_ppl": 100.0 - s})
    return out


def write_run(
    folder: Path,
    events: list[dict[str, Any]],
    summary: dict[str, Any] | None = None,
    mtime: float | None = None,
) -> Path:
    """A run folder as ``runs.py`` + ``MetricsLog`` write it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("model:\n  n_layer: 2\noptim:\n  lr: 0.002\n")
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    if mtime is not None:
        for p in [*folder.iterdir(), folder]:
            os.utime(p, (mtime, mtime))
    return folder


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    (tmp_path / "runs").mkdir()
    return TestClient(create_dashboard_app(tmp_path / "runs"))


def test_lists_runs_newest_first_nested_not_inside_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "old", train_events(range(1, 5)), {"steps": 4}, mtime=time.time() - 3600)
    write_run(root / "sweep" / "lr-1e-3", train_events(range(1, 3)), mtime=time.time() - 60)
    write_run(root / "new", train_events(range(1, 8)))
    # a run's own subfolders hold config.yaml/summary-like files but are not runs
    write_run(root / "new" / "checkpoints" / "step-000010", [], {"x": 1})
    write_run(root / "new" / "model", [], {"x": 1})
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    write_run(root / ".hidden" / "r", train_events(range(1, 3)))
    runs = list_runs(root)
    assert [r.name for r in runs] == ["new", "sweep/lr-1e-3", "old"]
    assert [r.status for r in runs] == ["live", "live", "finished"]
    assert runs[0].last["step"] == 7 and "loss" in runs[0].last
    # the root itself a run folder: one run, "."
    assert [r.name for r in list_runs(root / "old")] == ["."]
    assert run_folder(root / "old", ".") == (root / "old").resolve()


def test_half_written_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    events = train_events(range(1, 6))
    path = write_run(root / "live", events) / "metrics.jsonl"
    whole = json.dumps({"step": 6, "loss": 1.5, "lr": 1e-3})
    with open(path, "a") as f:
        f.write(whole[:17])  # the trainer is mid-write
    first = read_metrics_chunk(root, "live")
    assert first.events == events and first.bad_lines == 0
    assert first.offset == path.stat().st_size - 17  # the partial line is not consumed
    again = read_metrics_chunk(root, "live", first.offset, first.file_id)
    assert again.events == [] and again.offset == first.offset and not again.reset
    with open(path, "a") as f:
        f.write(whole[17:] + "\n")
    rest = read_metrics_chunk(root, "live", first.offset, first.file_id)
    assert rest.events == [json.loads(whole)] and not rest.reset
    assert first.events + rest.events == read_metrics(path)


def test_metrics_log_resume_rewrite_resets_the_reader(tmp_path: Path) -> None:
    """``MetricsLog`` on resume rewrites the file atomically with the kept events (a new file):
    a reader's old offset must not be applied to it."""
    root = tmp_path / "runs"
    run = write_run(root / "r", train_events(range(1, 21)))
    before = read_metrics_chunk(root, "r")
    log = MetricsLog(run, resume_step=10, tensorboard=False)
    log.log({"step": 11, "loss": 0.5, "lr": 1e-3})
    log.close()
    after = read_metrics_chunk(root, "r", before.offset, before.file_id)
    assert after.reset and after.file_id != before.file_id
    assert after.events == read_metrics(run / "metrics.jsonl")
    assert after.events[-1] == {"step": 11, "loss": 0.5, "lr": 1e-3}
    # a file cut shorter than the reader's offset (same inode) also starts over
    atomic_write_text(run / "metrics.jsonl", "")
    cut = read_metrics_chunk(root, "r", after.offset, after.file_id)
    assert cut.reset and cut.events == [] and cut.offset == 0


def test_damaged_lines_counted_nan_becomes_null_chunks_cover_all(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = write_run(root / "r", [])
    lines = [
        '{"step": 1, "loss": 2.0}',
        "not json at all",
        "[1, 2]",
        b"\xff\xfe".decode("latin-1"),
        '{"step": 2, "loss": NaN, "lr": Infinity, "skipped": "non-finite loss or gradient"}',
        "",
        '{"step": 3, "loss": 1.0}',
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="latin-1")
    chunk = read_metrics_chunk(root, "r")
    assert chunk.bad_lines == 3
    assert [e["step"] for e in chunk.events] == [1, 2, 3]
    assert chunk.events[1]["loss"] is None and chunk.events[1]["lr"] is None
    # the API's JSON must be valid for a browser (no NaN tokens)
    client = TestClient(create_dashboard_app(root))
    body = client.get("/web/metrics", params={"name": "r"}).text
    assert "NaN" not in body and "Infinity" not in body
    assert json.loads(body)["events"][1]["loss"] is None

    # a long log comes in bounded chunks that together are the whole log, in order
    many = train_events(range(1, 301))
    write_run(root / "long", many)
    got, offset, fid, reads = [], 0, "", 0
    while True:
        c = read_metrics_chunk(root, "long", offset, fid, max_bytes=2000)
        got += c.events
        offset, fid, reads = c.offset, c.file_id, reads + 1
        if not c.more:
            break
    assert got == many and reads > 5


def test_api_details_summary_samples_and_errors(tmp_path: Path, client: TestClient) -> None:
    root = tmp_path / "runs"
    summary = {"steps": 20, "val_loss": 4.2, "sample_prompt": "ROMEO:", "sample": " O, she"}
    write_run(root / "pre", train_events(range(1, 21)), summary)
    ft = {"steps": 5, "samples": [{"prompt": "2+2?", "answer": "4", "prediction": "4"}]}
    write_run(root / "ft", train_events(range(1, 6)), ft)
    bad = write_run(root / "bad", train_events(range(1, 3)))
    (bad / "summary.json").write_text('{"steps": 2, "val_')  # cut off mid-write
    (bad / "FAILED.txt").write_text("This run failed at ...:\nDataError: shard.bin is damaged\n")

    d = client.get("/web/run", params={"name": "pre"}).json()
    assert d["status"] == "finished" and d["summary"]["val_loss"] == 4.2
    assert d["samples"] == [{"prompt": "ROMEO:", "output": " O, she"}]
    assert d["config"].startswith("model:")
    d = client.get("/web/run", params={"name": "ft"}).json()
    assert d["samples"] == [{"prompt": "2+2?", "output": "4", "expected": "4"}]
    assert d["doctor"] == []  # a falling loss: nothing to report
    d = client.get("/web/run", params={"name": "bad"}).json()
    assert d["status"] == "failed" and "shard.bin is damaged" in d["failure"]
    assert d["doctor"] == []  # too short to diagnose
    assert d["summary"] is None and "not valid JSON" in d["summary_error"]
    runs = client.get("/web/runs").json()["runs"]
    assert {r["name"] for r in runs} == {"pre", "ft", "bad"}
    assert client.get("/web/info").json() == {"chat": False, "runs_dir": str(root)}
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    assert client.head("/").status_code == 200
    assert "uPlot" in client.get("/web/static/vendor/uplot/uPlot.iife.min.js").text


def test_nothing_outside_runs_dir_is_served(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    secret = write_run(tmp_path / "secret", train_events(range(1, 4)), {"token": "s3cret"})
    (tmp_path / "secret.txt").write_text("s3cret")
    write_run(root / "ok", train_events(range(1, 4)))
    (root / "linked").symlink_to(secret, target_is_directory=True)  # a run folder outside
    sneaky = write_run(root / "sneaky", [])
    (sneaky / "metrics.jsonl").unlink()
    (sneaky / "metrics.jsonl").symlink_to(secret / "metrics.jsonl")  # a log outside
    (sneaky / "summary.json").write_text("{}")
    (sneaky / "config.yaml").unlink()
    (sneaky / "config.yaml").symlink_to(tmp_path / "secret.txt")
    client = TestClient(create_dashboard_app(root))

    assert {r["name"] for r in client.get("/web/runs").json()["runs"]} == {"ok", "sneaky"}
    names = ["../secret", "ok/../../secret", "/etc", str(secret), "linked", "ok/..", "..",
             "./ok", "ok\\..\\..", "ok/", "", "ok/checkpoints/../../../secret"]  # fmt: skip
    for name in names:
        for endpoint in ("/web/run", "/web/metrics"):
            r = client.get(endpoint, params={"name": name})
            assert r.status_code in (404, 422), (endpoint, name, r.text)
            assert "s3cret" not in r.text
    m = client.get("/web/metrics", params={"name": "sneaky"}).json()
    assert m["events"] == []
    d = client.get("/web/run", params={"name": "sneaky"}).json()
    assert d["config"] is None and "s3cret" not in json.dumps(d)
    assert d["doctor"] is None  # the doctor does not read the outside log either
    # the static files: the router's own traversal guard, raw paths sent as typed
    for raw in ("/web/static/../__init__.py", "/web/static/%2e%2e/__init__.py",
                "/web/static/..%2f..%2f..%2fsecret.txt", "/web/static/%2e%2e%2frun_folders.py"):  # fmt: skip
        r = client.get(raw)
        assert r.status_code == 404, raw
        assert "def mount" not in r.text and "s3cret" not in r.text


def test_mount_without_runs_dir_and_with_chat() -> None:
    app = FastAPI()
    mount(app, runs_dir=None, chat=True)
    client = TestClient(app)
    assert client.get("/web/info").json() == {"chat": True, "runs_dir": None}
    r = client.get("/web/runs")
    assert r.status_code == 404 and "--runs_dir" in r.json()["detail"]


def test_runs_dir_that_disappears_is_a_clear_404(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "a", train_events(range(1, 3)))
    client = TestClient(create_dashboard_app(root))
    assert client.get("/web/runs").status_code == 200
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    root.rmdir()
    r = client.get("/web/runs")
    assert r.status_code == 404 and "no longer exists" in r.json()["detail"]


def test_dashboard_options_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        check_runs_dir(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_runs_dir(str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="no such folder"):  # serve mounts the page this way
        mount(FastAPI(), runs_dir=tmp_path / "nope", chat=True)
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+.*--port"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
    with pytest.raises(ConfigError, match="not an address"):
        bind("no-such-host.invalid", 0)


def test_lmforge_dashboard_command_serves_the_page(tmp_path: Path) -> None:
    """The README's one command: ``lmforge dashboard --runs_dir DIR --port N``."""
    import httpx

    root = tmp_path / "runs"
    write_run(root / "pretrain-1", train_events(range(1, 11)), {"steps": 10})
    cmd = [sys.executable, "-m", "lmforge", "dashboard", f"--runs_dir={root}", "--port=0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO / "src")})  # fmt: skip
    try:
        seen = ""
        while "http://" not in seen and proc.poll() is None:  # printed once the socket listens
            seen += proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", seen)
        assert found, seen
        base = f"http://127.0.0.1:{found.group(1)}"
        assert "app.js" in httpx.get(base + "/", timeout=30).text
        runs = httpx.get(base + "/web/runs", timeout=30).json()["runs"]
        assert [r["name"] for r in runs] == ["pretrain-1"]
        assert httpx.get(base + "/web/info", timeout=30).json()["chat"] is False
        assert httpx.get(base + "/v1/models", timeout=30).status_code == 404  # no model here
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    assert main(["dashboard", f"--runs_dir={tmp_path / 'nope'}"]) == 2
    assert "no such folder; pass --runs_dir=DIR" in capsys.readouterr().err
    assert main(["dashboard", f"--runs_dir={tmp_path}", "--port=http"]) == 2
    assert "port" in capsys.readouterr().err


def test_unreadable_file_is_a_500_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root reads every file, so the permission error is raised by hand, where the reader
    would meet it."""
    import lmforge.serve.web as web

    root = tmp_path / "runs"
    write_run(root / "r", train_events(range(1, 3)))

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(root / "r" / "metrics.jsonl"))

    monkeypatch.setattr(web, "read_metrics_chunk", denied)
    r = TestClient(create_dashboard_app(root)).get("/web/metrics", params={"name": "r"})
    assert r.status_code == 500
    assert r.json()["detail"] == (
        "run 'r': cannot read metrics.jsonl (Permission denied); check its permissions"
    )
