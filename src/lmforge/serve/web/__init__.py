"""The web page: a chat playground and a live run dashboard, served at ``/``.

``mount(app, runs_dir, chat)`` adds the page to a FastAPI app: ``lmforge serve`` mounts it with
the chat (which talks to the app's own ``/v1/chat/completions`` and ``/v1/models``),
``lmforge dashboard`` without. The page is plain HTML + one script + the vendored uPlot chart
library (``static/``): no CDN at run time and no front-end build step. Its JSON lives under
``/web/`` so it cannot collide with the OpenAI routes or ``/metrics``:

    GET /                          the page
    GET /web/info                  {"chat": bool, "runs_dir": str | null}
    GET /web/runs                  the run folders, newest first
    GET /web/run?name=RUN          status, config.yaml, summary.json, samples, FAILED.txt
    GET /web/metrics?name=RUN&offset=N&file_id=ID    metrics.jsonl events appended since N
    GET /web/static/...            index.js, style.css, vendor/uplot/

The handlers are plain ``def``: FastAPI runs them in its thread pool, so reading a large log
never stalls the event loop that streams chat tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from lmforge.errors import ConfigError
from lmforge.serve.web.run_folders import (
    RunNotFound,
    list_runs,
    read_metrics_chunk,
    run_details,
)

STATIC = Path(__file__).parent / "static"
_NO_CACHE = {"Cache-Control": "no-cache"}  # a new lmforge version's page shows at once


def mount(app: FastAPI, runs_dir: Path | None, chat: bool) -> None:
    """Serve the page at ``/`` and its data under ``/web/``: the run dashboard for the run
    folders under ``runs_dir`` (none when ``None``) and, when ``chat``, the chat playground.
    A ``runs_dir`` that is not a folder is a ``ConfigError`` (the server would start and show
    only an error)."""
    root = check_runs_dir(runs_dir) if runs_dir is not None else None
    router = APIRouter()

    def runs_root() -> Path:
        if root is None:
            raise HTTPException(404, "no runs folder: start the server with --runs_dir DIR")
        if not root.is_dir():
            raise HTTPException(404, f"the runs folder {root} no longer exists")
        return root

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_NO_CACHE)

    @router.get("/web/info")
    def info() -> dict[str, Any]:
        return {"chat": chat, "runs_dir": str(root) if root is not None else None}

    @router.get("/web/runs")
    def runs() -> dict[str, Any]:
        return {"runs": [asdict(r) for r in list_runs(runs_root())]}

    @router.get("/web/run")
    def run(name: str = Query(max_length=1024)) -> dict[str, Any]:
        with _run_errors(name):
            return run_details(runs_root(), name)

    @router.get("/web/metrics")
    def metrics(
        name: str = Query(max_length=1024),
        offset: int = Query(0, ge=0),
        file_id: str = Query("", max_length=64),
    ) -> dict[str, Any]:
        with _run_errors(name):
            return asdict(read_metrics_chunk(runs_root(), name, offset, file_id))

    app.include_router(router)
    app.mount("/web/static", StaticFiles(directory=STATIC), name="lmforge-web-static")


def check_runs_dir(runs_dir: str | Path) -> Path:
    """``--runs_dir`` as a folder that exists, or a ``ConfigError`` saying what to pass."""
    path = Path(runs_dir).expanduser()
    if not path.exists():
        raise ConfigError(
            f"runs_dir {runs_dir}: no such folder; pass --runs_dir=DIR, the folder holding your "
            "run folders (training commands write to runs/ unless given --out_dir), or create it"
        )
    if not path.is_dir():
        raise ConfigError(
            f"runs_dir {runs_dir} is a file, not a folder; pass the folder that holds the run "
            "folders (e.g. runs/)"
        )
    return path


@contextlib.contextmanager
def _run_errors(name: str) -> Iterator[None]:
    """A run that is not there is a 404; a file that cannot be read (permissions, I/O) a 500
    naming it, instead of a bare "Internal Server Error"."""
    try:
        yield
    except RunNotFound:
        raise HTTPException(404, f"no run {name!r} under the runs folder") from None
    except OSError as e:
        where = Path(e.filename).name if e.filename else "a file"
        raise HTTPException(
            500, f"run {name!r}: cannot read {where} ({e.strerror or e}); check its permissions"
        ) from None


__all__ = ["check_runs_dir", "mount"]
