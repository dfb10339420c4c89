"""The distributed seam: one recipe runs as one process, DDP, FSDP2 or tensor parallel.

Everything that knows about ``torch.distributed`` lives here, so recipes and ``fit()`` stay
single-process code with a ``Parallel`` handle passed through:

    par = setup(cfg.dist, device)              # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = parallelize(model, par, cfg.dist, precision)   # DDP / fully_shard / parallelize_module
    fit(..., parallel=par)                     # no_sync while accumulating, metrics reduced
    teardown(par)

Parallel layouts (``dist.strategy``):

ddp      every rank holds the whole model; gradients all-reduced (``DistributedDataParallel``)
fsdp     parameters, gradients and optimizer state sharded over ranks (FSDP2 ``fully_shard``,
         one unit per block, then the root)
tp       attention heads and MLP columns split over ranks (``parallelize_module``); every rank
         reads the same data
fsdp+tp  a 2-D mesh (dp, tp): tensor parallel inside each tp group, FSDP across groups

Checkpoints: ``none``/``ddp`` write the single-process checkpoint from rank 0. Sharded
layouts gather ``model.safetensors`` on rank 0 (so export, generate and eval read it as
usual, on any number of processes) and save the optimizer state sharded with
``torch.distributed.checkpoint`` under ``optimizer/``, which loads on any number of ranks
(read back through ``checkpoint/sharded.py``'s allow-listed reader).

Two files: this one is the job (torchrun launch, the process group, each rank's rows, the
collective evaluation, ``no_sync``, clipping); ``train/layouts.py`` is the model under a layout
(wrapping, unwrapping, gathering the weights, collective checkpoint save/load), re-exported
here. Nothing outside the two imports ``torch.distributed`` for training.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from lmforge.config import Section
from lmforge.data.loader import BatchSource, MicroBatch
from lmforge.errors import ConfigError

# The model side of the seam lives in train/layouts.py; callers keep using distributed.<name>.
from lmforge.train.layouts import (  # noqa: F401  (re-exported)
    full_model_state,
    load_optimizer,
    parallelize,
    qkv_tp_order,
    save_checkpoint,
    unwrap,
)

log = logging.getLogger(__name__)

SHARDED = ("fsdp", "tp", "fsdp+tp")


class DistConfig(Section):
    strategy: Literal["auto", "none", "ddp", "fsdp", "tp", "fsdp+tp"] = Field(
        "auto",
        description="auto = ddp when started with several processes (torchrun / --nproc), "
        "else none; fsdp shards weights, gradients and optimizer state; tp splits heads "
        "and MLP columns; fsdp+tp combines them on a 2-D mesh",
    )
    tp_size: int = Field(
        0,
        ge=0,
        description="ranks per tensor-parallel group; 0 = all ranks for tp (needed for fsdp+tp)",
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free gathered weights after forward (less memory, one more "
        "all-gather in backward)",
    )
    cpu_offload: bool = Field(
        False, description="fsdp: keep sharded weights, gradients and optimizer state in CPU RAM"
    )
    timeout_s: int = Field(
        600, gt=0, description="seconds a collective waits for the other ranks before failing"
    )


def set_local_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give one rank of a single-machine job on loopback
    (for processes started with ``torch.multiprocessing.spawn``: tests and benchmarks)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_tag() -> str:
    """`` [rank R/N]`` under a multi-process launch, else ``""``: prefix for every error message."""
    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        return f" [rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}]"
    return ""


def torchrun_command(name: str, nproc: int, args: list[str], debug: bool = False) -> list[str]:
    """``lmforge <name> --nproc N ARGS`` → the torchrun command line that runs ``lmforge <name>
    ARGS`` in N processes on this machine. Without ``--debug`` torchrun runs inside a small
    wrapper that reports a failed rank in one line instead of torchrun's traceback (the rank
    has already printed its own message)."""
    launcher = ["-m", "torch.distributed.run"] if debug else ["-c", _TORCHRUN_QUIET]
    return [
        sys.executable,
        *launcher,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lmforge",
        *name.split(),
        *args,
        *(["--debug"] if debug else []),
    ]


_TORCHRUN_QUIET = """\
import logging, signal, sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
logging.disable(logging.ERROR)  # torchrun's own log lines; the ranks print their messages
try:
    run(get_args_parser().parse_args(sys.argv[1:]))
except ChildFailedError as e:
    rank, failure = e.get_first_failure()
    code = failure.exitcode
    if code < 0:
        print(f"rank {rank} was stopped by signal {signal.Signals(-code).name}", file=sys.stderr)
    sys.exit(code if code > 0 else 1)
except SignalException as e:  # Ctrl-C / SIGTERM: torchrun has stopped the ranks
    sys.exit(128 + int(e.sigval))
"""


def run_under_torchrun(name: str, nproc: int, args: list[str], debug: bool) -> int:
    """Start ``torchrun --standalone --nproc_per_node N -m lmforge <name> ...``; torchrun stops
    every rank when one fails and exits non-zero."""
    import subprocess

    cmd = torchrun_command(name, nproc, args, debug)
    shown = " ".join(["torchrun", *cmd[3:]])  # after the interpreter and the launcher
    print(f"lmforge {name}: starting {nproc} processes: {shown}", file=sys.stderr)
    code = subprocess.call(cmd)
    if code not in (0, 2, 130):
        print(
            f"lmforge {name}: the {nproc}-process job failed (exit code {code}); the messages "
            "above name the failing rank. Resume from the last checkpoint with the same command "
            "plus --resume.",
            file=sys.stderr,
        )
    return code if code in (0, 2, 130) else 1


@dataclass
class Parallel:
    """What one process knows about the job: its rank, the layout, the mesh and the data split.

    ``dp_rank``/``dp_size`` say which part of the token stream this rank reads: tensor-parallel
    ranks of one group read the same data, data-parallel ranks disjoint parts.
    """

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh with dims ("dp",) or ("dp", "tp"); None for none/ddp
    # setup() started the process group (so teardown ends it); False when joining one that a
    # caller already runs (finetune pretraining its demo base inside its own job)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors: checkpoints go through torch.distributed.checkpoint."""
        return self.strategy in SHARDED

    @property
    def active(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _dp_group(self) -> Any:
        return self.mesh["dp"].get_group() if self.mesh is not None else None  # None = world

    def sum_over_data_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the data-parallel ranks (tp ranks hold identical copies)."""
        if self.dp_size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self._dp_group())
        return value

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one (a signal that reached one rank)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


SINGLE = Parallel()


def setup(cfg: DistConfig, device: torch.device, command: str = "pretrain") -> Parallel:
    """Join the job torchrun started (process group, device, mesh), or run as one process.

    ``device`` is the resolved ``train.device``; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    Backend: NCCL on CUDA, gloo on CPU. ``command`` names the recipe in error messages.
    """
    if not launched():
        if cfg.strategy not in ("auto", "none"):
            raise ConfigError(
                f"dist.strategy={cfg.strategy} needs several processes: start with "
                f"`lmforge {command} --nproc N ...` or "
                f"`torchrun --nproc_per_node N -m lmforge {command} ...`"
            )
        return Parallel(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    strategy = "ddp" if cfg.strategy == "auto" else cfg.strategy
    if strategy == "none" and world > 1:
        raise ConfigError(
            f"dist.strategy=none with {world} processes would train {world} separate models; "
            "use ddp, fsdp, tp or fsdp+tp"
        )
    tp = 1
    if strategy in ("tp", "fsdp+tp"):
        tp = cfg.tp_size or world
        if world % tp:
            raise ConfigError(f"dist.tp_size={tp} must divide the number of processes ({world})")
        if strategy == "fsdp+tp" and not 1 < tp < world:
            raise ConfigError(
                f"dist.strategy=fsdp+tp needs 1 < dist.tp_size < processes ({world}); got {tp}"
            )
    elif cfg.tp_size > 1:
        raise ConfigError(f"dist.tp_size={cfg.tp_size} needs dist.strategy=tp or fsdp+tp")

    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    mesh = None
    if strategy in SHARDED:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_rank = rank // tp  # init_device_mesh lays ranks out row-major: rank = dp * tp + tp_rank
    return Parallel(strategy, rank, world, dp_rank, world // tp, tp, device, mesh, owns_group)


def teardown(par: Parallel) -> None:
    """End the process group ``setup`` started (one joined from an outer job stays up)."""
    if par.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def require_strategy(par: Parallel, allowed: tuple[str, ...], what: str) -> None:
    """A ConfigError when ``what`` (a recipe or method) cannot run under ``par.strategy``."""
    if par.strategy not in ("none", *allowed):
        raise ConfigError(
            f"dist.strategy={par.strategy}: {what} runs under {' or '.join(allowed)} only; "
            f"set --dist.strategy={allowed[0]}"
        )


# --- data and evaluation ------------------------------------------------------------------------


class RankRows:
    """This data-parallel rank's rows of every global micro-batch of ``source``.

    ``source`` is built with the global micro-batch (``batch_size x dp_size`` rows) and is in
    the same state on every rank; rank r keeps rows ``[r*b, (r+1)*b)``. So ``dp_size`` ranks
    with micro-batch b see exactly the rows one process sees with micro-batch ``b x dp_size``
    (the equivalence the tests check), whatever the source (SFT rows, classification pairs,
    masked windows), and rank 0's ``state_dict`` resumes every rank. The price is that each
    rank assembles the whole global batch: cheap next to a forward and backward.
    """

    def __init__(self, source: BatchSource, par: Parallel) -> None:
        self.source = source
        self.rank, self.size = par.dp_rank, par.dp_size

    @property
    def context(self) -> int:
        return self.source.context

    def next_batch(self) -> MicroBatch:
        return _rows(self.source.next_batch(), self.rank, self.size)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def _rows(batch: Any, rank: int, size: int) -> Any:
    """Rank ``rank`` of ``size`` equal row blocks of every tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % size:
            raise ValueError(f"a batch of {batch.shape[0]} rows does not split over {size} ranks")
        n = batch.shape[0] // size
        return batch[rank * n : (rank + 1) * n]
    if isinstance(batch, tuple | list):
        return type(batch)(_rows(b, rank, size) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, rank, size) for k, v in batch.items()}
    return batch


def shard_batches(source: BatchSource, par: Parallel) -> BatchSource:
    """``source`` itself in one process, else ``RankRows`` over it (built with the global batch)."""
    return RankRows(source, par) if par.dp_size > 1 else source


def evaluator(
    par: Parallel, fn: Callable[[nn.Module], dict[str, float]]
) -> Callable[[nn.Module], dict[str, float]]:
    """``fit``'s ``evaluate`` under ``par``: the same metrics on every rank (they decide the best
    checkpoint and early stopping, which every rank must agree on).

    Unsharded layouts: rank 0 scores the plain module (replicas are identical) and broadcasts
    its result, the other ranks wait. Sharded layouts have collectives inside the forward, so
    every rank runs ``fn`` in lockstep on the same data.
    """
    if not par.active:
        return fn
    if par.sharded:
        return lambda model: fn(unwrap(model))
    return lambda model: par.broadcast(fn(unwrap(model)) if par.is_main else None)


# --- the training step ------------------------------------------------------------------------


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter (for non-final accumulation micro-steps)."""
    model = getattr(model, "_orig_mod", model)
    if type(model).__name__ == "DistributedDataParallel":
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient 2-norm over all ranks' shards, clipped to ``max_norm``; a plain tensor.

    ``torch.nn.utils.clip_grad_norm_`` cannot stack norms of DTensors that live on different
    meshes (fsdp+tp: 2-D for the split layers, 1-D for norms); norms are made whole per mesh.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = min(1.0, max_norm / (float(total) + 1e-6))  # a float: DTensor and plain grads alike
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
