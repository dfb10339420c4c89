"""``runs.training_run``: the one setup of the training recipes (classify, mlm, seq2seq) —
device, distributed job, run folder, failure note — and what it does when the body fails."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from lmforge import runs
from lmforge.errors import ConfigError
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import TrainConfig


class _WithDist(BaseModel):
    out_dir: str | None = None
    train: TrainConfig = TrainConfig(device="cpu")
    dist: DistConfig = DistConfig()


class _NoDist(BaseModel):  # seq2seq's shape: no dist section
    out_dir: str | None = None
    train: TrainConfig = TrainConfig(device="cpu")


@pytest.mark.parametrize("cfg_type", [_WithDist, _NoDist])
def test_one_process_run_in_out_dir(tmp_path: Path, cfg_type: type[BaseModel]) -> None:
    out = tmp_path / "run"
    before = time.perf_counter()
    with runs.training_run("mlm", cfg_type(out_dir=str(out))) as run:
        assert run.dir == out and out.is_dir() and run.created and run.resume_from is None
        assert run.par.device == torch.device("cpu") and run.is_main and not run.par.active
        assert run.started >= before  # wall_seconds counts from the command's start
        assert 0 <= run.elapsed() <= time.perf_counter() - before


def test_failed_body_leaves_no_folder_it_created(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with runs.training_run("classify", _WithDist(out_dir=str(out))) as run:
            runs.write_config(run, _NoDist())
            raise RuntimeError("boom")
    assert not out.exists()  # only config.yaml was there: nothing to resume or read


def test_failed_body_after_a_checkpoint_keeps_the_folder_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk"):
        with runs.training_run("classify", _WithDist(out_dir=str(out))):
            (out / "metrics.jsonl").write_text("{}\n")
            raise RuntimeError("disk")
    assert "RuntimeError: disk" in (out / runs.FAILED_NOTE).read_text()


def test_a_multi_process_strategy_without_a_launch_names_the_command(tmp_path: Path) -> None:
    cfg = _WithDist(out_dir=str(tmp_path / "run"), dist=DistConfig(strategy="fsdp"))
    with pytest.raises(ConfigError, match=r"lmforge mlm --nproc N"):
        with runs.training_run("mlm", cfg):
            pass
    assert not (tmp_path / "run").exists()  # nothing is created before the setup is valid
