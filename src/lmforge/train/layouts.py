"""The model under a parallel layout (``dist.strategy``): wrap it (DDP, FSDP2, tensor
parallel), unwrap it, gather its whole weights on rank 0, and save or restore its checkpoint
collectively.

Split from ``train/distributed.py`` (the process side of the seam: torchrun, the process
group, each rank's rows, ``no_sync``, clipping) along the line between the job and the model;
``distributed`` re-exports these names, so ``distributed.parallelize(...)`` reads as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmforge.checkpoint import store as ckpt_io
from lmforge.checkpoint.manifest import describe, manifest_of
from lmforge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # distributed imports this module: the types only, for the signatures
    from lmforge.train.distributed import DistConfig, Parallel


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

    from lmforge.checkpoint.sharded import load_sharded, read_metadata
    from lmforge.train.optim import MuonWithAdamW

    read_metadata(Path(ckpt) / "optimizer" / ".metadata")  # refuses a crafted file first
    if isinstance(optimizer, MuonWithAdamW):
        raise CheckpointError(
            f"{ckpt}: its optimizer state is sharded (fsdp/tp); optim.name=muon updates whole "
            "matrices and runs with dist.strategy=none or ddp only: resume with the optimizer "
            "and strategy the run used"
        )
    osd = get_optimizer_state_dict(model, optimizer)  # initialises empty state to load into
    holder = {"optimizer": osd}
    load_sharded(holder, Path(ckpt) / "optimizer")
    set_optimizer_state_dict(model, optimizer, holder["optimizer"])
