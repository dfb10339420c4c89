"""Trials of a search: each one a real ``lmforge <recipe>`` run in its own process and folder.

A trial process is what a user would run by hand (``lmforge pretrain --config trial.yaml``), so
a trial cannot leak state into the next, a crash fails one trial, not the search, and any
recipe can be tuned without hooks inside it. The pruner is fed by the eval events the run
appends to its metrics.jsonl; a pruned trial is stopped with SIGTERM, which the training loop
turns into a checkpoint and a clean exit.

The study lives in an Optuna storage (SQLite in the output folder by default; any database URL
Optuna accepts lets several machines share one study). A search that was killed resumes from
it: finished trials are kept, and a trial that was running in a process that no longer exists
is marked failed and its parameters are tried again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

STATES_DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
POLL_S = 0.5


class TrialFailed(Exception):
    """The trial's process exited with an error; the message holds its last output lines."""


def eval_events(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` in the run's eval events so far (tail-safe: a half-written
    last line is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event.get(metric), (int, float)) and "step" in event:
            out.append((int(event["step"]), float(event[metric])))
    return out


def run_trial(
    trial: optuna.Trial, recipe: str, config: dict[str, Any], trial_dir: Path, metric: str
) -> float:
    """Run one trial's ``config`` as ``lmforge <recipe>``; report its evals; return the metric
    at its last evaluation. Raises ``optuna.TrialPruned`` or ``TrialFailed``."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(config["out_dir"])
    config_path = trial_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log_path = trial_dir / "output.log"
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("run_dir", str(run_dir))
    cmd = [sys.executable, "-m", "lmforge", recipe, "--config", str(config_path)]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        trial.set_user_attr("pid", proc.pid)
        reported: set[int] = set()
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                for step, value in eval_events(run_dir, metric):
                    if step in reported:
                        continue
                    reported.add(step)
                    trial.report(value, step)
                    if trial.should_prune():
                        proc.send_signal(signal.SIGTERM)  # the loop checkpoints and exits
                        proc.wait()
                        raise optuna.TrialPruned(f"pruned at step {step}: {metric} {value:.4g}")
        finally:
            if proc.poll() is None:  # this process is being stopped: take the trial down too
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise TrialFailed(f"exit {proc.returncode}: " + " | ".join(tail))
    events = eval_events(run_dir, metric)
    if not events:
        raise TrialFailed(f"the run logged no {metric!r} (see {run_dir}/metrics.jsonl); "
                          "choose --metric from its eval events")  # fmt: skip
    return events[-1][1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a tuner process of this machine that is gone: mark them failed
    and queue their parameters again. Returns how many. (Running trials of live tuners, here
    or on other machines, are left alone.)"""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("tuner_pid")
        if t.user_attrs.get("host") != host or owner is None or _alive(int(owner)):
            continue
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        n += 1
    return n


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=STATES_DONE))
