"""Out-of-memory recovery that loses nothing: the same batch, split finer, redone.

In one process (and under DDP, whose ranks agree on an all-reduced flag at fixed points of the
step: ``step.accumulate_gradients``), the step catches the OOM, leaves the ``except`` block, frees
memory and redoes the step with every micro-batch cut in two (``split_micro_batches``); an OOM
in evaluation halves the evaluation batch instead. Both go through ``retry_on_oom``, and
``OomRecovery`` holds the rules (which OOM may be retried) and how far the run has shrunk.

With FSDP or tensor parallelism that in-process retry is not safe, so it is not attempted:

* collectives run *inside* forward and backward (FSDP all-gathers each block's weights and
  reduce-scatters its gradients, TP all-reduces every attention and MLP output). A rank that
  runs out of memory inside block k has left the collective sequence while the others wait in
  block k+1's all-gather; any collective it issues next — an agreement all-reduce, or a retried
  forward's first all-gather — is paired by order with the wrong one: a hang until the timeout,
  or worse, silently mixed all-gathers of equal-sized blocks;
* where the OOM strikes is not the same on every rank on a GPU (fragmentation, other processes,
  uneven shards), so ranks cannot count on all failing at the same op (``BudgetTracker`` on CPU,
  with equal shapes and budgets, is deterministic; CUDA is not);
* FSDP2 keeps the gradients of earlier micro-batches accumulated in its own unsharded buffers
  (``FSDPParam.unsharded_accumulated_grad``) while gradient sync is off; ``zero_grad`` does not
  clear them, so a retried step would add them twice. A new process starts clean.

So the rank that ran out writes an OOM record (``run_dir/oom/rank-R.json``: the step, the new
number of splits) and stops with ``OutOfMemoryStop``, a clear message; its exit makes torchrun (or
the process group's timeout) stop the other ranks — nothing waits forever. ``--resume`` (or, before
the first checkpoint, the same command again) continues from the last checkpoint with that many
splits: the data cursor and RNG state come from the checkpoint, so the same samples are seen in
the same order with the same effective batch, and the step counter is exact; the steps after the
checkpoint are computed again, no data is skipped or repeated. The split is kept in every later
checkpoint (``train_state["oom"]``). The same holds for an OOM inside DDP's last backward (its
gradient all-reduce is in flight) and for an OOM in evaluation under FSDP/TP (halved eval batch).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lmforge.atomic import atomic_write_text
from lmforge.train.distributed import Parallel

T = TypeVar("T")

RECORDS = "oom"  # folder of the run holding one record per rank that ran out


class AgreedOutOfMemory(torch.OutOfMemoryError):
    """Raised on every rank at the same point when one of them ran out of memory."""


class OutOfMemoryStop(RuntimeError):
    """This rank ran out of memory where the ranks cannot retry in step; its record is written
    and the run stops. ``--resume`` continues from the last checkpoint with the finer split."""


def split_micro_batches(
    micro_batches: list[tuple[torch.Tensor, ...]], parts: int = 2
) -> list[tuple[torch.Tensor, ...]]:
    """Each micro-batch cut into ``parts`` consecutive row blocks, in order (OOM recovery).

    The same rows in the same order, so the step's data and its token-normalised gradient are
    unchanged; raises ``torch.OutOfMemoryError`` when a micro-batch has fewer rows than parts.
    """
    out = []
    for x, y, *extra in micro_batches:
        if x.size(0) < parts:
            raise nothing_to_split(x.size(0))
        rows = torch.arange(x.size(0)).tensor_split(parts)
        for r in rows:
            piece = (x[r], y[r])
            if extra:
                piece += ({k: v[r] for k, v in extra[0].items()},)
            out.append(piece)
    return out


def nothing_to_split(rows: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"out of memory with a micro-batch of {rows} sequence(s): nothing left to split; use a "
        "smaller context, activation checkpointing, or a bigger device (`lmforge estimate --fit "
        "BUDGET` shows what fits)"
    )


def free_memory(device: torch.device) -> None:
    """After an OOM, outside the except block (its traceback pinned the activations)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def record_and_stop(
    run_dir: Path,
    rank: int,
    step: int,
    train: Any,
    splits: int | None = None,
    eval_batch: int | None = None,
    error: BaseException | None = None,
) -> BaseException:
    """Write this rank's OOM record for ``step`` (train: ``splits`` now needed; evaluation:
    ``eval_batch`` now needed) and return the ``OutOfMemoryStop`` to raise. ``train`` is the
    TrainConfig: a record applies only to a run with the same batch_size and grad_accum.
    Called inside the ``except`` block, where the failed step's tensors are still alive: it
    allocates no tensor."""
    record: dict[str, Any] = {"step": step, "rank": rank}
    record |= {"batch_size": train.batch_size, "grad_accum": train.grad_accum}
    if splits is not None:
        rows = -(-train.batch_size // splits)  # the largest piece
        record |= {"splits": splits, "micro_batch": rows}
        what = (
            f"micro-batches of {rows} sequence(s) ({splits} per configured micro-batch of "
            f"{train.batch_size}: twice the accumulation, the same samples and effective batch)"
        )
    else:
        record["eval_batch_size"] = eval_batch
        what = f"evaluation batches of {eval_batch} (training unchanged)"
    record["error"] = str(error).splitlines()[0][:300] if error else ""
    path = Path(run_dir) / RECORDS / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return OutOfMemoryStop(
        f"out of memory at step {step} on rank {rank}, where the ranks cannot retry together "
        f"(collectives inside FSDP/TP forward and backward, or DDP's synchronising last "
        f"micro-batch), so the run stops. Recorded in {path}: resume with --resume (the same "
        f"command before the first checkpoint) and the run continues from its last checkpoint "
        f"with {what}"
    )


def recorded(run_dir: Path, train: Any) -> dict[str, int]:
    """What the OOM records of ``run_dir`` ask for: ``{"splits": n, "eval_batch_size": b}``
    (only keys some record set; records of another batch_size/grad_accum are ignored)."""
    out: dict[str, int] = {}
    for path in sorted((Path(run_dir) / RECORDS).glob("rank-*.json")):
        r = json.loads(path.read_text())
        if (r.get("batch_size"), r.get("grad_accum")) != (train.batch_size, train.grad_accum):
            continue
        if "splits" in r:
            out["splits"] = max(out.get("splits", 1), int(r["splits"]))
        if r.get("eval_batch_size"):
            out["eval_batch_size"] = min(out.get("eval_batch_size", 2**62), r["eval_batch_size"])
    return out


def retry_on_oom(
    attempt: Callable[[], T],
    give_up: Callable[[torch.OutOfMemoryError], None],
    shrink: Callable[[], None],
    device: torch.device,
) -> T:
    """``attempt()`` until it fits in memory.

    On an out-of-memory error ``give_up(error)`` raises when this one must not be retried; it
    runs inside the ``except`` block, where the failed attempt's tensors are still alive, so it
    must allocate no tensor. Otherwise, out of the ``except`` block (its traceback pinned the
    activations), ``shrink()`` makes the next attempt smaller and the memory is freed.
    """
    while True:
        try:
            return attempt()
        except torch.OutOfMemoryError as e:
            give_up(e)
        shrink()
        free_memory(device)


@dataclass
class OomRecovery:
    """One run's out-of-memory rules and how far they have shrunk its batches.

    ``splits``: each configured micro-batch is cut into this many parts; ``eval_batch``:
    sequences per evaluation batch. Both persist in every checkpoint (``state_dict``), valid
    only for the same batch_size and grad_accum. ``train`` is the TrainConfig.
    """

    train: Any
    run_dir: Path
    parallel: Parallel
    splits: int = 1
    eval_batch: int = 1
    from_records: bool = False  # OOM records of a stopped run asked for this

    @classmethod
    def resume(
        cls, train: Any, run_dir: Path, parallel: Parallel, saved: dict[str, Any]
    ) -> OomRecovery:
        """As the checkpoint's ``train_state["oom"]`` (``saved``, {} when starting) left it, or
        finer if an OOM record of a run that stopped asks so. A collective: every rank calls it."""
        if (saved.get("batch_size"), saved.get("grad_accum")) != (
            train.batch_size,
            train.grad_accum,
        ):
            saved = {}  # resumed with another micro-batch or accumulation: start unsplit
        asked = parallel.broadcast(recorded(run_dir, train) if parallel.is_main else None)
        return cls(
            train,
            run_dir,
            parallel,
            splits=max(saved.get("splits", 1), asked.get("splits", 1)),
            eval_batch=min(
                train.eval_batch_size or train.batch_size,
                saved.get("eval_batch_size", 2**62),
                asked.get("eval_batch_size", 2**62),
            ),
            from_records=bool(asked),
        )

    def state_dict(self) -> dict[str, int]:
        state = {"splits": self.splits}
        state |= {"batch_size": self.train.batch_size, "grad_accum": self.train.grad_accum}
        if self.eval_batch < (self.train.eval_batch_size or self.train.batch_size):
            state["eval_batch_size"] = self.eval_batch
        return state

    def resumed_event(self, step: int) -> dict[str, Any] | None:
        """The metrics.jsonl event telling that the run starts with shrunk batches, if it does."""
        if self.splits == 1 and not self.from_records:
            return None
        return {"step": step, "oom": "resume", "micro_batch": self.micro_batch,
                "micro_batches": self.splits * self.train.grad_accum,
                "eval_batch_size": self.eval_batch}  # fmt: skip

    def halve_eval_batch(self) -> int:
        self.eval_batch //= 2
        return self.eval_batch

    @property
    def micro_batch(self) -> int:
        """Rows of the largest micro-batch piece."""
        return -(-self.train.batch_size // self.splits)

    @property
    def agree(self) -> bool:
        """DDP ranks agree on an OOM split (a flag all-reduced per micro-batch); FSDP/TP forwards
        have collectives inside them, so a rank that stops midway would deadlock the others:
        there the rank records the OOM and the run stops (``give_up_training``)."""
        return self.train.oom_recovery and self.parallel.active and self.parallel.strategy == "ddp"

    def give_up_training(self, error: torch.OutOfMemoryError, rows: int, step: int) -> None:
        """Raise unless step ``step``, in micro-batches of ``rows``, may be split and redone."""
        if not self.train.oom_recovery:
            raise error
        # several processes: only a split all ranks agreed on can be retried; otherwise record
        # it and stop (the others may wait in a collective)
        if self.parallel.active and not isinstance(error, AgreedOutOfMemory):
            if rows < 2:
                raise nothing_to_split(rows) from error
            raise record_and_stop(
                self.run_dir, self.parallel.rank, step, self.train, splits=self.splits * 2,
                error=error,
            ) from error  # fmt: skip

    def give_up_eval(self, error: torch.OutOfMemoryError, step: int) -> None:
        """Raise unless the evaluation at ``step`` may be redone with half the batch."""
        if not self.train.oom_recovery or self.eval_batch == 1:
            raise error
        if self.parallel.sharded:  # collectives in the forward: as in training
            raise record_and_stop(
                self.run_dir, self.parallel.rank, step, self.train,
                eval_batch=self.eval_batch // 2, error=error,
            ) from error  # fmt: skip
