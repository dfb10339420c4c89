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

Why one file of ~600 lines: it is the whole seam (launch, wrap, share the data, sync, clip,
collective save/load); a reader checking what runs differently under N ranks finds all of it
here, and nothing outside it imports ``torch.distributed`` for training.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from lmforge.checkpoint import store as ckpt_io
from lmforge.checkpoint.manifest import describe, manifest_of
from lmforge.config import Section
from lmforge.data.loader import BatchSource, MicroBatch
from lmforge.errors import CheckpointError, ConfigError

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


# --- wrapping the model ---------------------------------------------------------------------


def parallelize(
    model: nn.Module,
    par: Parallel,
    cfg: DistConfig,
    precision: str,
    *,
    unused_parameters: bool = False,
) -> nn.Module:
    """The model to train under ``par.strategy``; build the optimizer on it afterwards.

    ``ddp`` returns a ``DistributedDataParallel`` wrapper (``unwrap`` gives the module back);
    the other layouts change ``model`` in place and return it. ``unused_parameters``: some
    trainable parameters get no gradient in a step (e.g. an encoder's pooler under mean
    pooling); DDP then searches the graph for them each step instead of waiting forever.
    """
    if par.strategy == "none":
        return model
    if par.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer broadcast: lmforge's buffers (RoPE cos/sin) are constants computed alike on
        # every rank, and a broadcast at the start of each forward would be the only collective
        # inside DDP's forward. Without it, a rank that runs out of memory mid-forward can meet
        # the others at the OOM agreement (loop.accumulate_gradients) instead of deadlocking.
        return DDP(
            model,
            device_ids=[par.device.index] if par.device.type == "cuda" else None,
            forward_sync_buffers=False,
            find_unused_parameters=unused_parameters,
        )
    if par.strategy in ("tp", "fsdp+tp"):
        _tensor_parallel(model, par.mesh["tp"])
    if par.strategy in ("fsdp", "fsdp+tp"):
        _fully_shard(model, par.mesh["dp"], cfg, precision)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper and/or ``torch.compile`` (parameter names unprefixed)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return (
        getattr(model, "module", model)
        if type(model).__name__ == "DistributedDataParallel"
        else model
    )


def _fully_shard(model: nn.Module, mesh: Any, cfg: DistConfig, precision: str) -> None:
    """FSDP2: one unit per transformer block (gathered just in time), then the root
    (embeddings, final norm, head — the tied head shares the embedding's shard)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if precision == "bf16-mixed":
        # bf16 compute copies of the weights, fp32 gradient reduction and master weights.
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    # The root's parameters are needed again right at the start of backward: keep them.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def qkv_tp_order(n_head: int, n_kv_head: int, head_dim: int, tp: int) -> torch.Tensor:
    """Row order that makes an even split of the fused ``qkv`` weight give each tp rank its heads.

    The fused weight stacks [q (nh·hd rows); k (nkv·hd); v (nkv·hd)]. A column-parallel split
    cuts it into ``tp`` equal row blocks, which would hand rank 0 all of q and rank 1 k and v.
    Reordered to [q₀; k₀; v₀; q₁; k₁; v₁; …] (qᵣ = rank r's nh/tp query heads), block r is
    exactly rank r's q, k and v. Returns the (rows,) index: ``w_tp = w[order]``.
    """
    q, kv = n_head * head_dim, n_kv_head * head_dim
    qr, kvr = q // tp, kv // tp
    parts = []
    for r in range(tp):
        parts += [
            torch.arange(r * qr, (r + 1) * qr),
            q + torch.arange(r * kvr, (r + 1) * kvr),
            q + kv + torch.arange(r * kvr, (r + 1) * kvr),
        ]
    return torch.cat(parts)


def _tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Megatron-style TP per block: qkv / fc / gate / up column-parallel, the projections
    back into the residual stream row-parallel (one all-reduce per attention and per MLP).

    Embeddings, norms and the head stay replicated (sequence-parallel norms: not yet).
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    for block in model.blocks:
        attn = block.attn
        if attn.n_head % tp or attn.n_kv_head % tp:
            raise ConfigError(
                f"dist.tp_size={tp} must divide model.n_head ({attn.n_head}) and the kv heads "
                f"({attn.n_kv_head})"
            )
        order = qkv_tp_order(attn.n_head, attn.n_kv_head, attn.head_dim, tp)
        with torch.no_grad():
            attn.qkv.weight.copy_(attn.qkv.weight[order])
            if attn.qkv.bias is not None:
                attn.qkv.bias.copy_(attn.qkv.bias[order])
        plan: dict[str, Any] = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel()}
        for name in ("fc", "gate", "up"):
            if hasattr(block.mlp, name):
                plan[f"mlp.{name}"] = ColwiseParallel()
        plan["mlp.proj"] = RowwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        # Each rank now computes its own heads: the attention reshapes use local head counts.
        attn.n_head //= tp
        attn.n_kv_head //= tp
        attn.tp_size = tp  # read by full_model_state to undo the qkv row order


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the whole model's weights as plain CPU tensors on rank 0 ({} on other ranks),
    named and laid out exactly as a single-process checkpoint (tied copies dropped the way
    ``safetensors.save_model`` does: the alphabetically first name is kept)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = unwrap(model)
    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not state:
        return state
    by_param: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    for names in by_param.values():
        for dup in sorted(names)[1:]:
            state.pop(dup, None)
    for name, sub in module.named_modules():
        tp = getattr(sub, "tp_size", 1)
        if tp > 1:  # undo qkv_tp_order
            order = qkv_tp_order(sub.n_head * tp, sub.n_kv_head * tp, sub.head_dim, tp)
            inverse = torch.argsort(order)
            for suffix in ("weight", "bias"):
                key = f"{name}.qkv.{suffix}"
                if key in state:
                    state[key] = state[key][inverse].contiguous()
    return state


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


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(
    par: Parallel,
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    files: dict[str, str | bytes | Path],
    keep_last: int,
    is_best: bool,
) -> Path:
    """Every rank calls this; atomic like the single-process save (temp folder, rename, latest).

    ddp/none: rank 0 writes the ordinary checkpoint. Sharded layouts: all ranks write their
    optimizer shards into the temp folder with ``torch.distributed.checkpoint``, rank 0 adds
    the gathered ``model.safetensors`` and the rest, and renames after a barrier.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    name = ckpt_io.step_name(step)
    if not par.sharded:
        if par.is_main:
            ckpt_io.save_checkpoint(
                run_dir, step, unwrap(model), train_state, files, keep_last, is_best
            )
        par.barrier()
        return ckpt_root / name
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = full_model_state(model)  # collective
    optim_state = get_optimizer_state_dict(model, optimizer)
    tmp = ckpt_io.begin_checkpoint(ckpt_root, name) if par.is_main else None
    par.barrier()
    tmp = ckpt_root / f".tmp-{name}"
    dcp.save({"optimizer": optim_state}, checkpoint_id=str(tmp / "optimizer"))
    if par.is_main:
        state = {k: v for k, v in train_state.items() if k != "optimizer"}
        state["optimizer_layout"] = {"strategy": par.strategy, "tp_size": par.tp_size}
        manifest = describe(unwrap(model), "tokenizer.json" in files, sharded_optimizer=True)
        ckpt_io.write_checkpoint_files(tmp, weights, state, files, manifest)
    par.barrier()
    if par.is_main:
        ckpt_io.publish_checkpoint(ckpt_root, tmp, name, keep_last, is_best)
    par.barrier()
    return ckpt_root / name


def load_optimizer(
    par: Parallel, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, state: dict
) -> None:
    """Restore the optimizer of a checkpoint saved under any layout and number of ranks."""
    if "optimizer" in state:  # single process or ddp: one whole state dict
        if par.sharded:
            raise CheckpointError(
                f"{ckpt}: its optimizer state was saved by one process or ddp; resume it with "
                "dist.strategy=none or ddp (its weights load under any layout)"
            )
        optimizer.load_state_dict(state["optimizer"])
        return
    # The sharded path only for checkpoints that say they are sharded: the manifest, or (older
    # folders) the layout record of train_state.pt; its files are read without unpickling code.
    manifest = manifest_of(Path(ckpt))
    says_sharded = manifest.sharded_optimizer or (manifest.inferred and "optimizer_layout" in state)
    if not says_sharded or not (Path(ckpt) / "optimizer").is_dir():
        raise CheckpointError(
            f"{ckpt}: no optimizer state (train_state.pt has no optimizer and the checkpoint "
            "is not a sharded one with optimizer/); it cannot be resumed"
        )
    saved_tp = state.get("optimizer_layout", {}).get("tp_size", 1)
    if saved_tp > 1 and saved_tp != par.tp_size:
        raise CheckpointError(
            f"{ckpt}: its optimizer state was saved with dist.tp_size={saved_tp} (qkv rows in "
            f"tensor-parallel order); resume with the same tp size (weights load under any)"
        )
    if par.tp_size > 1 and saved_tp == 1:
        raise CheckpointError(
            f"{ckpt}: resuming a non-tp optimizer state under tensor parallelism is not supported"
        )
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from lmforge.checkpoint.sharded import load_sharded

    osd = get_optimizer_state_dict(model, optimizer)  # initialises empty state to load into
    holder = {"optimizer": osd}
    load_sharded(holder, Path(ckpt) / "optimizer")
    set_optimizer_state_dict(model, optimizer, holder["optimizer"])
