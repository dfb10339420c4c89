"""Watching a run: ``metrics.jsonl``, TensorBoard events and a progress line (plots: ``runs.py``)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lmforge.atomic import atomic_write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Append-only event log of a run; every event carries ``step``.

    On resume, events after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so the log reads like one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = (
            [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step]
            if resume_step
            else []
        )
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

            self._tb = SummaryWriter(
                str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None
            )

    def log(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in event.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, event["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class ProgressLine:
    """A live rich progress bar on a terminal; one plain line every ~5 % elsewhere (CI logs)."""

    def __init__(self, total: int, start: int = 0, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.total, self.start = total, start
        self.live = self.console.is_terminal
        self._next_print = start
        self._t0 = time.perf_counter()
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.live:
            self.bar.update(self.task, completed=step, info=info)
        elif step >= self._next_print or step == self.total:
            done = (step - self.start) / max(1, self.total - self.start)
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done - elapsed if done > 0 else float("nan")
            print(f"step {step}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)
            self._next_print = step + max(1, (self.total - self.start) // 20)

    def message(self, text: str) -> None:
        self.console.print(text) if self.live else print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            self.bar.stop()
