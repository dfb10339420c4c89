"""The run folder every recipe writes: create or resume it, ``config.yaml``, ``summary.json``, plots.

One set of functions for pretrain, prepare, finetune, classify and mlm, so a run folder looks
and behaves the same whatever made it:

    run = runs.start("finetune", cfg.out_dir, cfg.resume, par)   # folder (+ checkpoint to resume)
    with runs.failure_note(run):                                    # a failed run leaves no debris
        runs.write_config(run, cfg)
        ...
        runs.write_plots(run.dir); runs.write_summary(run, summary)

A training recipe takes all of that setup (device, distributed job, folder, failure note) in one
line: ``with runs.training_run("mlm", cfg) as run: ...``; ``runs.finish`` writes the end.

Under torchrun every rank calls these; rank 0 alone touches the disk (``Run.is_main``) and its
clock names the folder for all ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.store import find_checkpoint
from lmforge.config import save_config
from lmforge.errors import ConfigError, TrainingInterrupted
from lmforge.train import distributed
from lmforge.train.device import setup_device
from lmforge.train.metrics_log import read_metrics

log = logging.getLogger(__name__)

FAILED_NOTE = "FAILED.txt"


@dataclass
class Run:
    """A run folder as this process sees it."""

    dir: Path
    resume_from: Path | None = None  # the checkpoint a resumed run continues from
    created: bool = False  # this invocation made the folder (so it may remove it again)
    par: distributed.Parallel = field(default_factory=lambda: distributed.SINGLE)
    started: float = field(default_factory=time.perf_counter)  # perf_counter at the command's start

    @property
    def is_main(self) -> bool:
        return self.par.is_main

    def elapsed(self) -> float:
        """Seconds since the command started (``summary.json``'s ``wall_seconds``)."""
        return time.perf_counter() - self.started


def run_dir_of(path: str | Path) -> Path:
    """The run folder that holds a checkpoint (``run/checkpoints/step-N`` → ``run``), or the
    folder itself when ``path`` is a run folder."""
    ckpt = find_checkpoint(path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def resume_target(resume: bool | str | None, out_dir: str | None) -> Path | None:
    """What ``--resume`` points at: a checkpoint/run path, or (``--resume`` alone) ``out_dir``."""
    if not resume:
        return None
    if isinstance(resume, str):
        return Path(resume)
    if not out_dir:
        raise ConfigError(
            "resume: --resume needs --out_dir=RUN_FOLDER (or --resume=CHECKPOINT_OR_RUN_FOLDER)"
        )
    return Path(out_dir)


def saved_config(resume: bool | str | None, out_dir: str | None) -> Path | None:
    """The resolved ``config.yaml`` of the run ``--resume`` continues, if it has one.

    Config resolution uses it as the base when no ``--config`` is given, so that the command
    printed on an interrupt (``lmforge finetune --resume=<checkpoint>``) continues the same run
    with the same settings instead of starting the command's defaults.
    """
    target = resume_target(resume, out_dir)
    if target is None:
        return None
    path = run_dir_of(target) / "config.yaml"
    return path if path.is_file() else None


def start(
    command: str,
    out_dir: str | None,
    resume: bool | str | None = None,
    par: distributed.Parallel = distributed.SINGLE,
) -> Run:
    """The run folder: a resumed run continues in its own folder (whatever ``out_dir`` says);
    a new one goes to ``out_dir`` (default ``runs/<command>-<date>-<time>``), which must not
    already hold a run. The folder is created on rank 0; a path that cannot be a writable
    folder is a ``ConfigError`` naming it."""
    target = resume_target(resume, out_dir)
    if target is not None:
        ckpt = find_checkpoint(target)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        if out_dir and Path(out_dir).resolve() != run_dir.resolve():
            raise ConfigError(
                f"--resume={target} continues the run in {run_dir}, but --out_dir={out_dir} "
                "names another folder; drop --out_dir (to branch off, copy the run folder first)"
            )
        return Run(run_dir, ckpt, created=False, par=par)
    run_dir = Path(out_dir or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}")
    created, error = False, None
    if par.is_main:
        try:
            if (run_dir / "checkpoints" / "latest").exists():
                raise ConfigError(
                    f"out_dir {run_dir} already holds a run; add --resume to continue it, "
                    "or choose another --out_dir"
                )
            created = not run_dir.exists()
            make_dir(run_dir, "out_dir")
        except ConfigError as e:
            error = str(e)
    # rank 0's clock names the folder for all ranks; its error stops them all
    run_dir, created, error = par.broadcast((str(run_dir), created, error))
    if error:
        raise ConfigError(error)
    return Run(Path(run_dir), None, created=created, par=par)


@contextlib.contextmanager
def training_run(
    command: str,
    cfg: Any,
    resume: bool | str | None = None,
    strategies: tuple[str, ...] = ("ddp",),
) -> Iterator[Run]:
    """The setup every training recipe needs before its first step, written once: the device
    (``cfg.train``: device, threads, precision), the distributed job (``cfg.dist`` when the recipe
    has one, under one of its ``strategies``; else one process), the run folder (``cfg.out_dir``,
    ``resume``) and its ``failure_note``; the process group ends on the way out.

        with runs.training_run("mlm", cfg) as run:   # run.dir, run.par, run.par.device
            ...
            return runs.finish(run, {..., "wall_seconds": run.elapsed()})
    """
    started = time.perf_counter()
    device = setup_device(cfg.train.device, cfg.train.num_threads, cfg.train.precision)
    dist_cfg = getattr(cfg, "dist", None)
    if dist_cfg is None:
        par = distributed.Parallel(device=device)
    else:
        par = distributed.setup(dist_cfg, device, command)
    try:
        distributed.require_strategy(par, strategies, command)
        run = start(command, cfg.out_dir, resume, par)
        run.started = started
        log.info("run folder: %s", run.dir)
        with failure_note(run):
            yield run
    finally:
        distributed.teardown(par)


def make_dir(path: Path, what: str) -> None:
    """``mkdir -p`` with the errors a user can cause turned into a ``ConfigError`` naming the path."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"is under {parent}, which is"
            raise ConfigError(
                f"{what} {path} {where} a file, not a folder; choose another --{what}"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # permissions, read-only file system, name too long, ...
        raise ConfigError(
            f"{what} {path}: cannot create the folder ({e.strerror or e}); choose another --{what}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the folder is not writable; choose another --{what}")


def write_config(run: Run, cfg: BaseModel) -> None:
    """The fully resolved config as ``config.yaml`` (rank 0)."""
    if run.is_main:
        save_config(cfg, run.dir / "config.yaml")


def write_summary(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` (rank 0); returns ``summary``."""
    if run.is_main:
        atomic_write_text(run.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def failure_note(run: Run) -> Iterator[None]:
    """A run that fails leaves no folder holding only ``config.yaml`` (nothing to resume or
    read): a folder this run created and that holds nothing else is removed; any other is kept
    with ``FAILED.txt`` saying what went wrong. An interrupt with a checkpoint is no failure."""
    try:
        yield
    except TrainingInterrupted:
        raise
    except BaseException as e:
        if run.is_main and run.dir.is_dir():
            _after_failure(run, e)
        raise


def _after_failure(run: Run, error: BaseException) -> None:
    left = {p.name for p in run.dir.iterdir()} - {FAILED_NOTE}
    if run.created and left <= {"config.yaml"}:
        shutil.rmtree(run.dir, ignore_errors=True)
        return
    what = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    note = (
        f"This run {what} at {time.strftime('%Y-%m-%d %H:%M:%S')}:\n"
        f"{type(error).__name__}: {error}\n"
    )
    with contextlib.suppress(OSError):  # the failure may be the disk itself
        atomic_write_text(run.dir / FAILED_NOTE, note)


def write_plots(run_dir: Path) -> list[Path]:
    """``plots/loss.png`` (train and val loss vs step) and ``plots/lr.png`` from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    events = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [e for e in events if "loss" in e]
    val = [e for e in events if "val_loss" in e]
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train", lw=1)
    ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([e["step"] for e in train], [e["lr"] for e in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "lr.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "lr.png")
    return written


def finish(run: Run, summary: dict[str, Any], plots: bool = True) -> dict[str, Any]:
    """The end of a training run on rank 0: plots from metrics.jsonl, then ``summary.json``."""
    if run.is_main:
        if plots:
            write_plots(run.dir)
        write_summary(run, summary)
    return summary
