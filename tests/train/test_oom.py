"""OOM records (``train/oom.py``): what a stopped run writes and what a resumed run reads back.
The end-to-end runs are in test_distributed.py (FSDP stop and resume, DDP agreement) and
test_memory.py (one process)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.train.loop import TrainConfig
from lmforge.train.oom import OutOfMemoryStop, record_and_stop, recorded


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
