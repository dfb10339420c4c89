"""lmforge tune: the search space is checked before any trial; a real search finds a better
learning rate than its worst trial; a killed search resumes without repeating finished trials."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lmforge.errors import ConfigError
from lmforge.recipes.pretrain import PretrainConfig
from lmforge.recipes.tune import base_config, check_space, split_options
from lmforge.tune.space import grid, read_space

CORPORA = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "data" / "corpora"
TINY = [
    "--train.max_steps=24", "--train.eval_every=8", "--train.save_every=24",
    "--train.log_every=4", "--train.batch_size=4", "--model.n_layer=1", "--model.d_model=32",
    "--model.n_head=2", "--model.n_kv_head=2", "--model.context_length=32",
    "--sample.max_new_tokens=2", "--sched.warmup_steps=2",
]  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_space_reads_the_three_kinds(tmp_path: Path) -> None:
    space = read_space(write(tmp_path / "s.yaml", """
optim.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
model.n_layer: {type: int, low: 2, high: 8}
sched.name: {type: categorical, choices: [cosine, linear]}
"""))  # fmt: skip
    assert space["optim.lr"].log and space["model.n_layer"].high == 8
    assert list(space["sched.name"].choices) == ["cosine", "linear"]
    assert grid({"model.n_layer": space["model.n_layer"]}, "s.yaml") == {
        "model.n_layer": [2, 3, 4, 5, 6, 7, 8]
    }
    with pytest.raises(ConfigError, match="grid sampler needs"):
        grid({"optim.lr": space["optim.lr"]}, "s.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lr: {type: gaussian}", "type float, int or categorical"),
        ("optim.lr: {type: float, low: 1}", "low and high are required"),
        ("optim.lr: {type: float, low: 1, high: 2, lg: true}", r"unknown field\(s\) \['lg'\]"),
        ("sched.name: {type: categorical, choices: []}", "non-empty list"),
        ("optim.lr: {type: float, low: 0.1, high: 0.01}", "optim.lr"),
        ("", "empty"),
    ],
)
def test_a_bad_space_names_its_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_space(write(tmp_path / "s.yaml", text))


def test_space_keys_are_checked_against_the_recipe(tmp_path: Path) -> None:
    base = base_config("pretrain", None, {})
    ok = read_space(write(tmp_path / "ok.yaml", "optim.lr: {type: float, low: 1.0e-4, high: 0.1}"))
    check_space("pretrain", base, ok, "ok.yaml")
    typo = read_space(write(tmp_path / "t.yaml", "optim.lrr: {type: float, low: 0.1, high: 1}"))
    with pytest.raises(ConfigError, match=r"t.yaml: optim.lrr=.*not valid for `lmforge pretrain`"):
        check_space("pretrain", base, typo, "t.yaml")
    negative = read_space(write(tmp_path / "n.yaml", "optim.lr: {type: float, low: -1, high: 1}"))
    with pytest.raises(ConfigError, match="optim.lr=-1.0"):
        check_space("pretrain", base, negative, "n.yaml")


def test_options_split_between_tune_and_the_recipe() -> None:
    cfg, rest = split_options({"recipe": "pretrain", "space": "s.yaml", "n_trials": 3,
                               "out_dir": "d", "train": {"max_steps": 5}})  # fmt: skip
    assert cfg.n_trials == 3 and rest == {"train": {"max_steps": 5}}
    with pytest.raises(ConfigError, match="n_trials"):
        split_options({"recipe": "pretrain", "space": "s.yaml", "out_dir": "d"})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    (root / "corpus").mkdir()
    lines = (CORPORA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()[:3000]
    write(root / "corpus" / "s.txt", "\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-m", "lmforge", "data", "prepare", "--data.path=corpus/",
                    "--out_dir=prepared", "--data.vocab_size=300"], cwd=root, check=True,
                   capture_output=True)  # fmt: skip
    write(root / "space.yaml", "optim.lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}\n")
    return root


def tune_cmd(out: str, n: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "tune", "--recipe", "pretrain", "--space",
            "space.yaml", "--n_trials", str(n), "--out_dir", out, "--data.path=prepared",
            "--pruner=none", *TINY, *extra]  # fmt: skip


def rows(out: Path) -> list[dict]:
    with open(out / "trials.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # 4 small pretrain runs: ~1-2 min on 2 cores
def test_a_search_over_the_learning_rate_beats_its_worst_trial(prepared: Path) -> None:
    done = subprocess.run(tune_cmd("lr", 4, "--sampler=random"), cwd=prepared,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    values = [float(r["val_loss"]) for r in rows(prepared / "lr") if r["state"] == "COMPLETE"]
    assert len(values) == 4
    assert min(values) < max(values) - 0.3, values  # lr 1e-5 barely learns in 24 steps
    best = yaml.safe_load((prepared / "lr" / "best_config.yaml").read_text())
    assert best["out_dir"] is None
    assert PretrainConfig.model_validate(best).train.max_steps == 24  # runs as is
    assert (prepared / "lr" / "history.png").stat().st_size > 1000


@pytest.mark.slow  # a killed search and its resume: ~2 min on 2 cores
def test_a_killed_search_resumes_without_repeating_finished_trials(prepared: Path) -> None:
    out = prepared / "killed"
    storage = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(tune_cmd("killed", 3), cwd=prepared, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                study = optuna.load_study(study_name="killed", storage=storage)
            except Exception:  # not created yet
                continue
            states = [t.state for t in study.get_trials()]
            if optuna.trial.TrialState.COMPLETE in states and len(states) >= 2:
                break
        else:
            pytest.fail("the first trial did not finish in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its running trial, no clean-up
        proc.wait()
    before = {t.number: t.value for t in study.get_trials() if t.state.name == "COMPLETE"}
    done = subprocess.run(tune_cmd("killed", 3), cwd=prepared, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "interrupted by a stopped search will run again" in done.stdout
    after = optuna.load_study(study_name="killed", storage=storage).get_trials()
    complete = {t.number: t.value for t in after if t.state.name == "COMPLETE"}
    assert len(complete) == 3
    assert all(complete[n] == v for n, v in before.items())  # kept, not run again
    failed = [t for t in after if t.state.name == "FAIL"]
    retried = [t for t in after if "retry_of" in t.user_attrs]
    assert len(failed) == 1 and retried and retried[0].params == failed[0].params


@pytest.mark.slow  # two tuners × 2 small runs: ~1-2 min on 2 cores
def test_two_worker_processes_share_one_study(prepared: Path) -> None:
    """Several machines share a study through one storage URL; here two processes, one file."""
    out = prepared / "shared"
    storage = f"sqlite:///{out / 'study.db'}"
    out.mkdir()
    optuna.create_study(study_name="shared", storage=storage)  # as an operator would, once
    extra = ["--storage", storage, "--n_jobs=1"]
    workers = [subprocess.Popen(tune_cmd("shared", 4, *extra), cwd=prepared, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]  # fmt: skip
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # each worker checks the count after its own trials
    assert len({t.user_attrs["tuner_pid"] for t in complete}) == 2  # both did work
    assert len({t.number for t in complete}) == len(complete)
