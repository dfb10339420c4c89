"""``lmforge serve --checkpoint PATH``: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

    lmforge serve --checkpoint runs/finetune-…/model --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "default", "messages": [...]}'

Decoders serve /v1/completions and /v1/chat/completions through the continuous-batching
engine; encoders serve /v1/embeddings. Binds 127.0.0.1 unless told otherwise; ``--api_key``
makes every /v1 route ask for it. See docs/serving.md.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

from pydantic import Field

from lmforge.checkpoint.load import load
from lmforge.config import Section
from lmforge.data.chat_template import ChatFormat
from lmforge.errors import ConfigError
from lmforge.train.device import resolve_device

log = logging.getLogger(__name__)


class ServeConfig(Section):
    checkpoint: str = Field(
        description="checkpoint or run folder, Hugging Face folder or .gguf file; its folder "
        "(or file) name is the model id in /v1/models"
    )
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 = any free port")
    api_key: str | None = Field(
        None, description="require `Authorization: Bearer KEY` on /v1 routes; null = open"
    )
    runs_dir: str | None = Field(
        None, description="run folders the web page's dashboard lists; null = no dashboard"
    )
    cors_origins: list[str] = Field(
        [], description="origins browsers may call from (CORS); [] = off"
    )
    max_batch: int = Field(8, gt=0, description="requests decoded together (continuous batching)")
    max_queue: int = Field(64, ge=0, description="requests that may wait; more get HTTP 429")
    max_len: int | None = Field(
        None, gt=0, description="KV cache columns per request (prompt + max_tokens); "
        "null = the model's context, at most 4096"
    )  # fmt: skip
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")


def model_id(checkpoint: str | Path) -> str:
    """The id /v1/models shows: the name of the folder (or .gguf file) the user gave."""
    path = Path(checkpoint).resolve()
    return path.stem if path.is_file() else path.name


def build_app(cfg: ServeConfig, engine_thread: bool = True):  # -> FastAPI (lazy: serve extra)
    """Load the checkpoint and build the app (``serve`` runs it; tests call this directly)."""
    from lmforge.serve.app import create_app

    if cfg.api_key is not None and not cfg.api_key.strip():
        raise ConfigError("--api_key is empty: give a key, or leave it out for an open server")
    device = resolve_device(cfg.device)
    kinds = ("decoder", "encoder-mlm", "sequence-classifier", "token-classifier")
    model, tokenizer, manifest = load(cfg.checkpoint, device, expect=kinds)
    chat, stop = None, ()
    if manifest.kind == "decoder":
        ckpt = manifest.path
        chat = ChatFormat.for_checkpoint(ckpt, tokenizer)
        stop = tuple(chat.stop_ids(ckpt if ckpt.is_dir() else None))
    # A context of 8k tokens x 32 rows of cache would be GBs on a CPU: cap the default.
    max_len = cfg.max_len or min(getattr(getattr(model, "cfg", None), "context_length", 0), 4096)
    return create_app(
        model,
        tokenizer,
        model_id(cfg.checkpoint),
        chat=chat,
        stop_ids=stop,
        api_key=cfg.api_key,
        cors_origins=cfg.cors_origins,
        runs_dir=Path(cfg.runs_dir) if cfg.runs_dir else None,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        max_len=max_len or None,
        engine_thread=engine_thread,
    )


def serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    app = build_app(cfg, engine_thread=False)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        log.warning("serving on %s without --api_key: anyone who can reach it can use it", cfg.host)
    # Bound here, not by uvicorn: a busy port is then a usage error that says what to do
    # (uvicorn logs it and exits 3 after loading the model).
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): another program may use "
            "the port; pick another with --port (0 = any free one) or check --host"
        ) from None
    host, port = sock.getsockname()[:2]
    log.info("lmforge serve: http://%s:%d/v1 serving model %r; the page: http://%s:%d/",
             host, port, app.state.model_id, host, port)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    engine = app.state.engine
    if engine is None:  # an encoder: nothing decodes
        server.run(sockets=[sock])
        return

    # HTTP in a thread, decoding on the main thread (Engine.start says why). The app's
    # shutdown stops the engine's loop; Ctrl-C or SIGTERM here stops the server.
    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()  # also when the server could not start

    thread = threading.Thread(target=http, name="lmforge-http", daemon=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: a clean shutdown
    thread.start()
    try:
        engine.loop()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(timeout=30)
