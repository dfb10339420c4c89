"""Reading run folders for the dashboard: which runs there are, their metrics, config and summary.

A run folder is what ``runs.py`` writes (``metrics.jsonl``, ``config.yaml``, ``summary.json``,
``FAILED.txt``); any folder under the root holding ``metrics.jsonl`` or ``summary.json`` counts,
a few levels deep (``runs/sweep-3/lr-1e-3``), and a run's own subfolders (checkpoints, a merged
``model/``) are not searched. A run may be live: ``metrics.jsonl`` is then read from a byte
offset, and a last line without its newline yet (the trainer is mid-write) is left for the next
read. Nothing outside the root is ever read: run names are checked (no ``..``, no absolute
paths) and every file is resolved and must lie inside the root, so a symlink pointing out of it
is refused rather than followed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_DEPTH = 3  # runs/<project>/<sweep>/<run>: deeper trees are not searched
LIVE_SECONDS = 300.0  # a run whose files changed this recently, with no summary, is "live"
MAX_TEXT_BYTES = 256 * 1024  # config.yaml / FAILED.txt shown at most this long
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # metrics.jsonl bytes returned by one read
_SKIP_DIRS = {"checkpoints", "tensorboard", "plots", "data", "eval", "model", "adapter"}


class RunNotFound(LookupError):
    """No run of that name under the root (or a name that would leave it)."""


@dataclass
class MetricsChunk:
    """Complete events of ``metrics.jsonl`` from byte ``start`` up to ``offset``.

    ``file_id`` names the file's identity (device and inode): a resumed run rewrites the log
    atomically (a new inode) and a reader holding another id must start over (``reset``).
    ``more`` says the chunk was cut at ``MAX_CHUNK_BYTES`` and the rest can be read at once."""

    events: list[dict[str, Any]]
    offset: int
    file_id: str
    reset: bool = False
    more: bool = False
    bad_lines: int = 0  # complete lines that are not a JSON object (skipped, counted)


@dataclass
class RunInfo:
    name: str  # path under the root, "/"-separated; "." when the root itself is a run
    status: str  # finished | failed | live | unfinished
    updated: float  # newest mtime of its files (s since the epoch)
    last: dict[str, Any] = field(default_factory=dict)  # the last complete metrics event


def _finite(value: str) -> None:
    """json.loads' hook for NaN / Infinity: the browser's JSON has no such numbers; a non-finite
    loss is shown as a gap in the curve."""
    return None


def _parse_event(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line.decode("utf-8"), parse_constant=_finite)
    except (UnicodeDecodeError, ValueError):
        return None
    return event if isinstance(event, dict) else None


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies inside ``root`` (already resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _is_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() or (folder / "summary.json").is_file()


def list_runs(root: Path) -> list[RunInfo]:
    """The run folders under ``root``, most recently written first."""
    root = root.resolve()
    found: list[RunInfo] = []

    def visit(folder: Path, depth: int) -> None:
        if _is_run(folder):
            name = folder.relative_to(root).as_posix()
            found.append(_info(root, folder, name))
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable folder: skipped, like `ls` would report and go on
            return
        for entry in children:
            if entry.name.startswith(".") or entry.name in _SKIP_DIRS:
                continue
            path = Path(entry.path)
            if entry.is_dir() and _inside(root, path):
                visit(path, depth + 1)

    visit(root, 0)
    found.sort(key=lambda r: r.updated, reverse=True)
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _info(root: Path, folder: Path, name: str) -> RunInfo:
    files = [folder / n for n in ("metrics.jsonl", "summary.json", "config.yaml", "FAILED.txt")]
    updated = max([_mtime(folder)] + [_mtime(f) for f in files])
    return RunInfo(name, _status(folder, updated), updated, _last_event(root, folder))


def _status(folder: Path, updated: float) -> str:
    if (folder / "FAILED.txt").is_file():
        return "failed"
    if (folder / "summary.json").is_file():
        return "finished"
    return "live" if time.time() - updated < LIVE_SECONDS else "unfinished"


def _last_event(root: Path, folder: Path) -> dict[str, Any]:
    """The last complete event with a loss (read from the file's last 8 kB, not the whole log)."""
    path = folder / "metrics.jsonl"
    if not path.is_file() or not _inside(root, path):
        return {}
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read()
    except OSError:
        return {}
    for line in reversed(tail.split(b"\n")[1:-1]):  # first may be cut, last is after the "\n"
        event = _parse_event(line)
        if event is not None and "loss" in event:
            return event
    return {}


def run_folder(root: Path, name: str) -> Path:
    """The folder of run ``name`` under ``root``; ``RunNotFound`` for anything else (a name with
    ``..``, an absolute path, a symlink out of the root, a folder that is not a run)."""
    root = root.resolve()
    parts = name.split("/")
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or any(p in ("", "..") for p in parts)
        or (name != "." and "." in parts)
    ):
        raise RunNotFound(name)
    folder = root if name == "." else root.joinpath(*parts)
    if not _inside(root, folder) or not folder.is_dir() or not _is_run(folder):
        raise RunNotFound(name)
    return folder


def _file(root: Path, folder: Path, filename: str) -> Path | None:
    """``folder/filename`` if it is a regular file inside the root."""
    path = folder / filename
    return path if path.is_file() and _inside(root.resolve(), path) else None


def read_metrics_chunk(
    root: Path, name: str, offset: int = 0, file_id: str = "", max_bytes: int = MAX_CHUNK_BYTES
) -> MetricsChunk:
    """Complete events of run ``name``'s ``metrics.jsonl`` after byte ``offset``.

    Pass back the returned ``offset`` and ``file_id`` to read only what was appended since. A
    last line with no newline yet is not returned (nor counted as bad): the trainer is writing
    it, and the next read returns it whole."""
    path = _file(root, run_folder(root, name), "metrics.jsonl")
    try:
        f = open(path, "rb") if path is not None else None
    except FileNotFoundError:  # removed since it was looked at
        f = None
    if f is None:
        return MetricsChunk([], 0, "", reset=offset > 0)
    with f:
        st = os.fstat(f.fileno())
        this_id = f"{st.st_dev}-{st.st_ino}"
        reset = offset > 0 and (this_id != file_id or offset > st.st_size)
        start = 0 if reset else max(0, offset)
        f.seek(start)
        events: list[dict[str, Any]] = []
        bad = 0
        position = start
        for line in f:  # binary lines: a partial UTF-8 character cannot break the split
            if not line.endswith(b"\n"):
                break  # half-written last line
            if position - start + len(line) > max_bytes and events:
                return MetricsChunk(events, position, this_id, reset, more=True, bad_lines=bad)
            position += len(line)
            if not line.strip():
                continue
            event = _parse_event(line)
            if event is None:
                bad += 1
            else:
                events.append(event)
    return MetricsChunk(events, position, this_id, reset, bad_lines=bad)


def _read_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:  # removed since it was looked at
        return None
    text = data[:MAX_TEXT_BYTES].decode("utf-8", errors="replace")
    return text + ("\n… (cut at 256 kB)" if len(data) > MAX_TEXT_BYTES else "")


def run_details(root: Path, name: str) -> dict[str, Any]:
    """Everything about run ``name`` but its metrics: status, ``config.yaml`` text, the parsed
    ``summary.json`` (or why it could not be read), samples, ``FAILED.txt``."""
    root_resolved = root.resolve()
    folder = run_folder(root, name)
    summary: dict[str, Any] | None = None
    summary_error = None
    summary_path = _file(root, folder, "summary.json")
    if summary_path is not None:
        try:
            summary = json.loads(summary_path.read_bytes().decode("utf-8"), parse_constant=_finite)
            if not isinstance(summary, dict):
                summary, summary_error = None, "summary.json does not hold a JSON object"
        except (UnicodeDecodeError, ValueError) as e:
            summary_error = f"summary.json is not valid JSON ({e}); the run may have been cut off"
    info = _info(root_resolved, folder, name)
    return {
        "name": name,
        "status": info.status,
        "updated": info.updated,
        "config": _read_text(_file(root, folder, "config.yaml")),
        "summary": summary,
        "summary_error": summary_error,
        "samples": samples_of(summary or {}),
        "failure": _read_text(_file(root, folder, "FAILED.txt")),
        "doctor": _doctor(root, folder),
    }


def _doctor(root: Path, folder: Path) -> list[dict[str, Any]] | None:
    """The training doctor's findings (``lmforge doctor``), or None when it cannot read the run
    (no metrics yet, a damaged line, or files that lead outside the runs folder)."""
    from lmforge.diagnose.doctor import diagnose
    from lmforge.errors import LmforgeError

    if _file(root, folder, "metrics.jsonl") is None:
        return None
    if (folder / "config.yaml").exists() and _file(root, folder, "config.yaml") is None:
        return None
    try:
        return [f.to_dict() for f in diagnose(folder)]
    except (LmforgeError, OSError, ValueError):  # no metrics yet, or a damaged line
        return None


def samples_of(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Sample text a recipe put in its summary: pretrain's ``sample_prompt`` + ``sample``,
    finetune's ``samples`` (prompt, prediction, answer)."""
    out: list[dict[str, str]] = []
    if isinstance(summary.get("sample"), str):
        out.append({"prompt": str(summary.get("sample_prompt") or ""), "output": summary["sample"]})
    for s in summary.get("samples") or []:
        if isinstance(s, dict):
            row = {"prompt": str(s.get("prompt", "")), "output": str(s.get("prediction", ""))}
            if "answer" in s:
                row["expected"] = str(s["answer"])
            out.append(row)
    return out
