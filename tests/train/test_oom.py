"""OOM recovery (``train/oom.py``): the retry helper, which OOM each strategy may retry, what a
stopped run writes and what a resumed run reads back. The end-to-end runs are in
test_step.py (the split step), test_distributed.py (FSDP stop and resume, DDP agreement) and
tests/plan/test_estimate.py (one process under a memory budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lmforge.train.distributed import SINGLE, Parallel
from lmforge.train.loop import TrainConfig
from lmforge.train.oom import (
    AgreedOutOfMemory,
    OomRecovery,
    OutOfMemoryStop,
    record_and_stop,
    recorded,
    retry_on_oom,
)


def test_records_ask_for_the_finest_split_of_this_batch_configuration(tmp_path: Path) -> None:
    train = TrainConfig(batch_size=8, grad_accum=2)
    stop = record_and_stop(tmp_path, 1, 5, train, splits=2, error=torch.OutOfMemoryError("x\ny"))
    assert isinstance(stop, OutOfMemoryStop)
    assert "step 5 on rank 1" in str(stop) and "--resume" in str(stop)
    assert "micro-batches of 4 sequence(s)" in str(stop)
    record = json.loads((tmp_path / "oom" / "rank-1.json").read_text())
    assert record == dict(
        step=5, rank=1, batch_size=8, grad_accum=2, splits=2, micro_batch=4, error="x"
    )
    record_and_stop(tmp_path, 0, 7, train, splits=4)  # a later stop, after a resume
    record_and_stop(tmp_path, 2, 7, train, eval_batch=3)  # evaluation ran out on rank 2
    assert recorded(tmp_path, train) == {"splits": 4, "eval_batch_size": 3}
    # records of another micro-batch or accumulation do not apply
    assert recorded(tmp_path, TrainConfig(batch_size=4, grad_accum=4)) == {}
    assert recorded(tmp_path / "elsewhere", train) == {}


def test_retry_shrinks_outside_the_except_block_until_it_fits() -> None:
    sizes, seen = [8], []

    def attempt() -> int:
        if sizes[-1] > 2:
            raise torch.OutOfMemoryError(f"{sizes[-1]} rows")
        return sizes[-1]

    def give_up(e: torch.OutOfMemoryError) -> None:
        seen.append((str(e), sys.exc_info()[1] is e))  # inside the except block

    def shrink() -> None:
        assert sys.exc_info() == (None, None, None)  # the traceback no longer pins tensors
        sizes.append(sizes[-1] // 2)

    assert retry_on_oom(attempt, give_up, shrink, torch.device("cpu")) == 2
    assert seen == [("8 rows", True), ("4 rows", True)] and sizes == [8, 4, 2]

    def refuse(e: torch.OutOfMemoryError) -> None:
        raise RuntimeError("no retry") from e

    sizes[:] = [8]
    with pytest.raises(RuntimeError, match="no retry"):
        retry_on_oom(attempt, refuse, shrink, torch.device("cpu"))
    assert sizes == [8]  # nothing shrunk


def two_ranks(strategy: str) -> Parallel:
    return Parallel(strategy=strategy, rank=1, world_size=2, dp_rank=1, dp_size=2)


def test_which_oom_may_be_retried(tmp_path: Path) -> None:
    train = TrainConfig(batch_size=4, grad_accum=1)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    OomRecovery(train, tmp_path, SINGLE).give_up_training(oom, rows=4, step=3)  # retried
    ddp = OomRecovery(train, tmp_path, two_ranks("ddp"))
    assert ddp.agree
    ddp.give_up_training(AgreedOutOfMemory("all ranks"), rows=4, step=3)  # retried together
    # an OOM the ranks did not agree on (FSDP, TP, DDP's last backward): record and stop
    fsdp = OomRecovery(train, tmp_path, two_ranks("fsdp"), splits=2)
    assert not fsdp.agree
    with pytest.raises(OutOfMemoryStop, match="step 3 on rank 1"):
        fsdp.give_up_training(oom, rows=2, step=3)
    assert recorded(tmp_path, train) == {"splits": 4}
    with pytest.raises(torch.OutOfMemoryError, match="nothing left to split"):
        fsdp.give_up_training(oom, rows=1, step=3)
    # evaluation: halve the batch down to 1; sharded runs record the halved batch and stop
    OomRecovery(train, tmp_path, SINGLE, eval_batch=2).give_up_eval(oom, step=5)
    with pytest.raises(torch.OutOfMemoryError):
        OomRecovery(train, tmp_path, SINGLE, eval_batch=1).give_up_eval(oom, step=5)
    with pytest.raises(OutOfMemoryStop):
        OomRecovery(train, tmp_path, two_ranks("fsdp"), eval_batch=4).give_up_eval(oom, step=5)
    assert recorded(tmp_path, train) == {"eval_batch_size": 2}  # rank 1's latest record
    off = OomRecovery(train.model_copy(update={"oom_recovery": False}), tmp_path, SINGLE)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA"):
        off.give_up_training(oom, rows=4, step=3)


def test_resume_takes_the_checkpoint_split_or_a_finer_recorded_one(tmp_path: Path) -> None:
    train = TrainConfig(batch_size=8, grad_accum=2, eval_batch_size=16)
    fresh = OomRecovery.resume(train, tmp_path, SINGLE, {})
    assert (fresh.splits, fresh.eval_batch, fresh.resumed_event(0)) == (1, 16, None)
    assert fresh.state_dict() == {"splits": 1, "batch_size": 8, "grad_accum": 2}
    saved = {"splits": 2, "batch_size": 8, "grad_accum": 2, "eval_batch_size": 8}
    again = OomRecovery.resume(train, tmp_path, SINGLE, saved)
    assert again.state_dict() == saved  # round-trip: the checkpoint's train_state["oom"]
    assert again.resumed_event(5) == {
        "step": 5, "oom": "resume", "micro_batch": 4, "micro_batches": 4, "eval_batch_size": 8,
    }  # fmt: skip
    # another micro-batch or accumulation: the saved split no longer applies
    assert (
        OomRecovery.resume(
            train.model_copy(update={"grad_accum": 4}), tmp_path, SINGLE, saved
        ).splits
        == 1
    )
    record_and_stop(tmp_path, 1, 7, train, splits=8)  # a stopped run asks for more
    asked = OomRecovery.resume(train, tmp_path, SINGLE, saved)
    assert (asked.splits, asked.eval_batch, asked.from_records) == (8, 8, True)
