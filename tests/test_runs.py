"""The run folder every recipe shares (``lmforge/runs.py``): where it goes, what a bad
``--out_dir`` says, what ``--resume`` continues, and what a failed run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmforge import runs
from lmforge.cli import main
from lmforge.errors import ConfigError, TrainingInterrupted


def fake_run(root: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """A run folder with checkpoints (``latest`` = the last) and its resolved config."""
    for s in steps:
        ckpt = root / "checkpoints" / f"step-{s:06d}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(ckpt / "model.safetensors"))  # complete, not damaged
    (root / "checkpoints" / "latest").write_text(f"step-{steps[-1]:06d}\n")
    (root / "config.yaml").write_text("method: full\n")
    return root


def test_new_run_folder_default_name_and_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = runs.start("mlm", None)
    assert run.created and run.resume_from is None
    assert run.dir.parent == Path("runs") and run.dir.name.startswith("mlm-") and run.dir.is_dir()
    runs.write_config(run, runs_cfg := _Cfg(x=3))
    assert (run.dir / "config.yaml").read_text() == "x: 3\n" and runs_cfg.x == 3
    runs.finish(run, {"steps": 1}, plots=False)
    assert json.loads((run.dir / "summary.json").read_text()) == {"steps": 1}


def test_out_dir_that_is_a_file_or_under_a_file_names_the_path(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ConfigError, match=f"out_dir {f} is a file"):
        runs.start("classify", str(f))
    with pytest.raises(ConfigError, match=f"out_dir {f}/run is under {f}, which is a file"):
        runs.start("classify", str(f / "run"))
    assert f.read_text() == "hello"


def test_unwritable_out_dir_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    # tests run as root, which writes anywhere: stand in for a read-only folder
    monkeypatch.setattr(runs.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"out_dir {tmp_path}: the folder is not writable"):
        runs.start("mlm", str(tmp_path))


def test_cli_bad_out_dir_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    """Was FileExistsError with exit code 1."""
    f = tmp_path / "taken"
    f.write_text("")
    assert main(["data", "prepare", f"--out_dir={f}"]) == 2
    assert f"out_dir {f} is a file" in capsys.readouterr().err


def test_a_folder_holding_a_run_is_refused_unless_resumed(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run; add --resume"):
        runs.start("finetune", str(run_dir))
    for resume, out_dir in (
        (True, str(run_dir)),
        (str(run_dir), None),
        (str(run_dir), str(run_dir)),
    ):
        run = runs.start("finetune", out_dir, resume)
        assert run.dir == run_dir and run.resume_from == run_dir / "checkpoints" / "step-000004"
        assert not run.created


def test_resume_continues_in_the_checkpoints_own_run_folder(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path / "run")
    step2 = run_dir / "checkpoints" / "step-000002"
    run = runs.start("finetune", None, str(step2))
    assert run.dir == run_dir and run.resume_from == step2  # not runs/finetune-<now>
    assert runs.saved_config(str(step2), None) == run_dir / "config.yaml"
    assert runs.saved_config(True, str(run_dir)) == run_dir / "config.yaml"
    assert runs.saved_config(None, str(run_dir)) is None
    with pytest.raises(ConfigError, match="names another folder"):
        runs.start("finetune", str(tmp_path / "elsewhere"), str(step2))
    with pytest.raises(ConfigError, match="--resume needs --out_dir"):
        runs.start("finetune", None, True)


def test_failed_run_leaves_no_folder_holding_only_its_config(tmp_path: Path) -> None:
    run = runs.start("finetune", str(tmp_path / "run"))
    with pytest.raises(ValueError, match="boom"), runs.failure_note(run):
        runs.write_config(run, _Cfg(x=1))
        raise ValueError("boom")
    assert not run.dir.exists()


def test_failed_run_with_results_keeps_them_with_a_note(tmp_path: Path) -> None:
    run = runs.start("pretrain", str(tmp_path / "run"))
    with pytest.raises(RuntimeError), runs.failure_note(run):
        runs.write_config(run, _Cfg(x=1))
        (run.dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
        raise RuntimeError("diverged")
    assert (run.dir / "metrics.jsonl").is_file()
    assert "RuntimeError: diverged" in (run.dir / runs.FAILED_NOTE).read_text()


def test_existing_or_resumed_folders_are_never_removed(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    run = runs.start("mlm", str(tmp_path / "mine"))  # the user's own (empty) folder
    with pytest.raises(ValueError), runs.failure_note(run):
        raise ValueError("x")
    assert (tmp_path / "mine" / runs.FAILED_NOTE).is_file()
    resumed = runs.start("finetune", None, str(fake_run(tmp_path / "run")))
    with pytest.raises(TrainingInterrupted), runs.failure_note(resumed):
        raise TrainingInterrupted(4, resumed.dir / "checkpoints" / "step-000004")
    assert not (resumed.dir / runs.FAILED_NOTE).exists()  # an interrupt with a checkpoint


def test_cli_failing_finetune_leaves_nothing(tmp_path: Path, capsys) -> None:
    """Was: an out_dir holding only config.yaml after a bad --base."""
    out = tmp_path / "run"
    assert main(["finetune", f"--base={tmp_path / 'missing'}", f"--out_dir={out}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune", "classify", "mlm"])
def test_every_training_recipe_checks_precision_before_any_work(
    command: str, tmp_path: Path, capsys
) -> None:
    """One device setup for all (classify and mlm used to skip the precision check)."""
    out = tmp_path / "run"
    args = [command, "--train.precision=fp16-mixed", "--train.device=cpu", f"--out_dir={out}"]
    assert main(args) == 2
    assert "fp16-mixed needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_write_plots(tmp_path: Path) -> None:
    events = [{"step": s, "loss": 4.0 / s, "lr": 1e-3} for s in range(1, 5)]
    events.append({"step": 4, "val_loss": 1.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    written = runs.write_plots(tmp_path)
    assert [p.name for p in written] == ["loss.png", "lr.png"]
    assert all(p.stat().st_size > 1000 for p in written)


from lmforge.config import Section  # noqa: E402


class _Cfg(Section):
    x: int = 0
