"""``lmforge dashboard --runs_dir DIR [--port N]``: the run dashboard alone, no model loaded.

The page lists the run folders under ``runs_dir`` by name and draws the newest run's loss curve
at once; each run shows its loss / validation / learning-rate curves (re-read every 2 s while it
trains), config, summary and sample, and two runs can be compared on one chart. It is the page
``lmforge serve --runs_dir DIR`` also serves, without the chat (``lmforge.serve.web``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from lmforge import __version__
from lmforge.config import Section
from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


class DashboardConfig(Section):
    runs_dir: str = Field("runs", description="folder holding the run folders (searched 3 deep)")
    port: int = Field(8001, ge=0, le=65535, description="TCP port; 0 = any free port")
    host: str = Field(
        "127.0.0.1",
        description="address to listen on; the dashboard has no login, so anything but "
        "localhost shows your runs' configs to whoever can reach the port",
    )


def create_dashboard_app(runs_dir: Path) -> FastAPI:
    """The dashboard as an ASGI app: the page and its run-folder API, no chat."""
    from fastapi import FastAPI

    from lmforge.serve.web import mount

    app = FastAPI(title="lmforge dashboard", version=__version__, docs_url=None, redoc_url=None)
    mount(app, runs_dir=runs_dir, chat=False)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is an error naming it (uvicorn would log and exit)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"host {host!r}: not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port=N "
            "(0 = any free port) or --host"
        ) from None
    sock.listen(128)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def dashboard(cfg: DashboardConfig) -> int:
    """Serve the dashboard until Ctrl-C."""
    try:  # the optional [web] extra; --help and the config work without it
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"lmforge dashboard needs {e.name}, which is not installed: pip install 'lmforge[web]'"
        ) from None
    runs_dir = Path(cfg.runs_dir).expanduser()
    app = create_dashboard_app(runs_dir)  # a runs_dir that is no folder is a ConfigError here
    sock = bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    if not _is_loopback(cfg.host):
        log.warning(
            "dashboard: listening on %s, not localhost: the page has no login, anyone who can "
            "reach this port sees the runs under %s",
            cfg.host,
            runs_dir,
        )
    print(
        f"lmforge dashboard: runs under {runs_dir.resolve()} at http://{shown}:{port}/ "
        "(Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
