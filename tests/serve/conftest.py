"""A live ``lmforge serve`` app on a free localhost port, with a tiny decoder checkpoint."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="lmforge serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("openai", reason="the serve tests talk through the official openai client")

import uvicorn  # noqa: E402
from tests.tiny_checkpoint import write_tiny_decoder  # noqa: E402

from lmforge.recipes.serve import ServeConfig, build_app  # noqa: E402

TEXT = (
    "The cat sat on the mat. The dog ran to the park. A bird sang in the tree. "
    "Café, naïve, 你好世界, emoji 🙂 and more text to learn merges from. "
) * 20


@dataclass
class Live:
    url: str
    app: Any
    checkpoint: Path

    @property
    def engine(self) -> Any:
        return self.app.state.engine


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("ckpt") / "tiny-chat", TEXT, 400, 1024)


def start(cfg: ServeConfig) -> tuple[uvicorn.Server, threading.Thread, str, Any]:
    """Serve ``cfg`` in a thread on a port the OS picked; returns once it accepts requests."""
    app = build_app(cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start within 30 s"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}", app


@pytest.fixture(scope="module")
def live(tiny_ckpt: Path) -> Iterator[Live]:
    server, thread, url, app = start(ServeConfig(checkpoint=str(tiny_ckpt), max_batch=8))
    yield Live(url, app, tiny_ckpt)
    server.should_exit = True
    thread.join(10)
