"""Auto-fit: the fastest configuration whose predicted peak fits a memory budget.

``plan_fit`` searches, for the global batch the user asked for (per device), every micro-batch
that divides it (accumulation = global / micro-batch, so the global batch never changes) x
activation checkpointing none / selective / full, and predicts each peak with
``plan.estimate.estimate``. Precision and method are the user's: the planner changes them only
when the user allows it (``train.memory_allow``), and then only as far as needed — it walks down a
ladder (precision fp32 → bf16-mixed → bf16, then method full → lora → qlora) and stops at the
first rung where something fits, because they change what is trained, not just how fast. Every
change is named in the plan with the reason (what the rung above needed). The plan is printed
and written as ``memory_plan.json`` into the run folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from lmforge.errors import ConfigError
from lmforge.models.decoder import DecoderConfig
from lmforge.plan.estimate import estimate, fmt_bytes, parse_bytes
from lmforge.plan.hardware import flops_per_token
from lmforge.plan.workload import (
    LMFORGE_PRACTICE,
    Optimizer,
    PeerPractice,
    Workload,
    lora_terms,
)

log = logging.getLogger(__name__)

SAFETY_MARGIN = 0.05  # of the budget kept free: allocator slack and estimate error
Change = Literal["precision", "method"]
# Lower-memory precisions, in the order the planner tries them (fp16-mixed sits beside
# bf16-mixed: from there only pure bf16 is smaller).
PRECISION_STEPS = {"fp32": ("bf16-mixed", "bf16"), "bf16-mixed": ("bf16",)}
PRECISION_STEPS |= {"fp16-mixed": ("bf16",), "bf16": ()}
# Lighter methods, in order: adapters instead of all weights, then an NF4 base under them.
METHOD_STEPS = {"full": ("lora", "qlora"), "freeze": ("lora", "qlora")}
METHOD_STEPS |= {"lora": ("qlora",), "dora": ("qlora",), "qlora": ()}


def _describe(w: Workload) -> str:
    return (
        f"micro-batch {w.batch} x {w.grad_accum} accumulation, checkpointing {w.checkpointing}, "
        f"{w.precision}, {w.method}"
    )


class _Option(NamedTuple):
    need: float  # predicted peak + runtime overhead, bytes
    speed: float  # relative tokens per second (see ``_options``)
    preference: int  # at equal speed: none (2) over selective (1) over full (0)
    workload: Workload


def _options(
    cfg: DecoderConfig, w: Workload, global_batch: int, peer: PeerPractice
) -> list[_Option]:
    """Every micro-batch x checkpointing option of ``w``'s precision and method."""
    out = []
    for micro in (d for d in range(1, global_batch + 1) if global_batch % d == 0):
        for preference, mode in enumerate(("full", "selective", "none")):
            option = replace(w, batch=micro, grad_accum=global_batch // micro, checkpointing=mode)
            est = estimate(cfg, option, peer)
            # throughput: FLOPs/token (x4/3 with full checkpointing, not with selective, which
            # reruns only pointwise ops) and b/(b+1) of the large-batch speed for a micro-batch
            # of b (launch and per-step overhead; a rough, stated assumption). At equal speed:
            # none over selective over full, then the smaller peak.
            speed = (micro / (micro + 1)) / flops_per_token(cfg, w.seq, mode)
            out.append(_Option(est.peak + est.runtime_overhead, speed, preference, option))
    return out


def plan_fit(
    cfg: DecoderConfig,
    w: Workload,
    budget: float,
    global_batch: int,
    allow: Collection[Change] = (),
    margin: float = SAFETY_MARGIN,
    runnable: Collection[str] | None = None,
    could_allow: Collection[Change] = ("precision", "method"),
    peer: PeerPractice = LMFORGE_PRACTICE,
) -> dict[str, Any]:
    """The fastest micro-batch / accumulation / checkpointing whose predicted peak plus runtime
    overhead fits ``budget`` x (1 - ``margin``), for ``global_batch`` sequences per device.

    ``allow`` lets it also change precision and/or method (see the module docstring), never
    otherwise; ``runnable`` limits the precisions it may switch to (what the device supports).
    ``could_allow`` names what the "nothing fits" message may suggest allowing; ``peer`` is
    another library's loop practice (``lmforge estimate --loss_chunks``). Returns the plan
    (``fits``, ``micro_batch``, ``grad_accum``, ``activation_checkpointing``, ``precision``,
    ``method``, ``predicted_peak``, ``changes`` with the reason for each, ``summary``) or, when
    nothing fits, ``fits`` false with the smallest need found.
    """
    usable = budget * (1 - margin)
    precisions = [w.precision]
    if "precision" in allow:
        steps = PRECISION_STEPS.get(w.precision, ())
        precisions += [p for p in steps if runnable is None or p in runnable]
    methods = [w.method] + (list(METHOD_STEPS.get(w.method, ())) if "method" in allow else [])
    rungs: list[tuple[str, str, float, Workload]] = []  # tried, nothing fitted: smallest need
    for method in methods:
        for prec in precisions:
            options = _options(cfg, replace(w, method=method, precision=prec), global_batch, peer)
            fitting = [o for o in options if o.need <= usable]
            if not fitting:
                smallest = min(options, key=lambda o: o.need)
                rungs.append((method, prec, smallest.need, smallest.workload))
                continue
            need, _, _, best = max(fitting, key=lambda o: (o.speed, o.preference, -o.need))
            changes = []
            tried = ", ".join(f"{m} {p} needs {fmt_bytes(n)}" for m, p, n, _ in rungs)
            why = f"nothing fits otherwise (smallest option: {tried}; usable {fmt_bytes(usable)})"
            for field, old, new in (("precision", w.precision, prec), ("method", w.method, method)):
                if old != new:
                    changes.append({"field": field, "from": old, "to": new, "why": why})
            changed = "".join(f"; changed {c['field']} {c['from']} → {c['to']}" for c in changes)
            summary = (
                f"{_describe(best)}: predicted {fmt_bytes(need)} of {fmt_bytes(budget)} "
                f"({1 - need / budget:.0%} free){changed}{' because ' + why if changes else ''}"
            )
            return dict(
                budget=budget, usable=usable, margin=margin, fits=True, global_batch=global_batch,
                micro_batch=best.batch, grad_accum=best.grad_accum,
                activation_checkpointing=best.checkpointing, precision=prec, method=method,
                predicted_peak=need, headroom=1 - need / budget, allowed=sorted(allow),
                changes=changes, summary=summary,
            )  # fmt: skip
    *_, needed, smallest = min(rungs, key=lambda r: r[2])
    missing = [c for c in could_allow if c not in allow]
    if "method" in missing and not METHOD_STEPS.get(w.method):
        missing.remove("method")
    if "precision" in missing and not PRECISION_STEPS.get(w.precision):
        missing.remove("precision")
    allow_list = f"[{','.join(missing)}]"
    hint = (
        f"let the planner change {' and '.join(missing)}: --train.memory_allow={allow_list} "
        f"(lmforge estimate: --memory_allow={allow_list}); or "
        if missing
        else ""
    )
    summary = (
        f"nothing fits in {fmt_bytes(budget)} ({fmt_bytes(usable)} usable after the "
        f"{margin:.0%} safety margin): the smallest option ({_describe(smallest)}) needs "
        f"{fmt_bytes(needed)}; {hint}use ZeRO-3/FSDP over more devices, or a bigger device"
    )
    return dict(
        budget=budget, usable=usable, margin=margin, fits=False, global_batch=global_batch,
        needed=needed, smallest=_describe(smallest), allowed=sorted(allow), summary=summary,
    )  # fmt: skip


def device_free_bytes(device_type: str) -> float:
    """``auto`` budget: free memory of the current CUDA device, or available host RAM."""
    import os

    if device_type == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def budget_bytes(spec: str, device_type: str, option: str = "train.memory_budget") -> float:
    """``24GiB`` / ``40GB`` / ``auto`` (the device's free memory) → bytes; anything else is a
    ``ConfigError`` naming ``option`` (where the budget was given) and the accepted forms."""
    if spec == "auto":
        return device_free_bytes(device_type)
    try:
        return parse_bytes(spec)
    except ValueError:
        raise ConfigError(
            f"{option}={spec}: not a memory budget; give a size such as 24GiB, 80GB or 512MiB "
            "(GiB/MiB: powers of 2, GB/MB: powers of 10), or auto for this machine's free "
            "device memory"
        ) from None


def train_workload(train: Any, optim: Any, seq: int, device_type: str, **fields: Any) -> Workload:
    """The ``Workload`` of a ``TrainConfig`` and ``OptimConfig`` (micro-batch, accumulation,
    precision, checkpointing, optimizer) at ``seq`` tokens per row; ``fields`` adds the rest (a
    fine-tune's method and adapters)."""
    name = optim.name if optim.name in get_args(Optimizer) else "adamw"
    return Workload(
        batch=train.batch_size, seq=seq, grad_accum=train.grad_accum, precision=train.precision,
        optimizer=name, momentum=getattr(optim, "momentum", 0.9),
        device="cuda" if device_type == "cuda" else "cpu",
        checkpointing=train.activation_checkpointing, **fields,
    )  # fmt: skip


def finetune_workload(cfg: Any, model_cfg: DecoderConfig, device_type: str) -> Workload:
    """What a fine-tune (a ``FinetuneConfig``) runs, for the estimator (``lmforge estimate
    --config``) and the planner (``train.memory_budget``): micro-batch, accumulation, row length,
    precision, checkpointing, optimizer, method and adapters (``lora.targets`` in lmforge's
    module names, mapped by ``lora_terms``). A ValueError names a target it does not know."""
    lora = cfg.lora
    return train_workload(
        cfg.train, cfg.optim, cfg.row_length(model_cfg), device_type, method=cfg.method,
        lora_rank=lora.rank, lora_targets=lora_terms(lora.targets), lora_dropout=lora.dropout,
        qlora_double_quant=lora.double_quant, train_blocks=lora.train_blocks,
        train_norms=lora.train_norms, train_embeddings=lora.train_embeddings,
    )  # fmt: skip


def apply_memory_budget(
    train: Any,
    w: Workload,
    cfg: DecoderConfig,
    device_type: str,
    run_dir: str | Path,
    method_changes: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """``train.memory_budget`` → (the TrainConfig with the plan's micro-batch, accumulation,
    checkpointing and precision; the plan). ``w`` is the run's workload (``train_workload``);
    ``method_changes``: the recipe can switch method (finetune), so ``train.memory_allow`` may
    name it. The plan is logged and written to ``run_dir/memory_plan.json``; nothing fitting is
    a ``ConfigError`` that names the smallest need and what to allow."""
    import torch

    from lmforge.atomic import atomic_write_text
    from lmforge.train.precision import precision_error

    if "method" in train.memory_allow and not method_changes:
        raise ConfigError(
            "train.memory_allow: 'method' applies to lmforge finetune (pretraining trains every "
            "weight); allow only precision here"
        )
    device = torch.device(device_type)
    runnable = (
        [p for p in PRECISION_STEPS if precision_error(p, device) is None]
        if device_type != "cuda" or torch.cuda.is_available()
        else None  # planning for a GPU this machine does not have (tests)
    )
    plan = plan_fit(
        cfg, w, budget_bytes(train.memory_budget, device_type), train.batch_size * train.grad_accum,
        allow=train.memory_allow, runnable=runnable,
        could_allow=("precision", "method") if method_changes else ("precision",),
    )  # fmt: skip
    plan["requested"] = train.memory_budget
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "memory_plan.json", json.dumps(plan, indent=2) + "\n")
    log.info("memory plan (train.memory_budget=%s): %s", train.memory_budget, plan["summary"])
    if not plan["fits"]:
        raise ConfigError(f"train.memory_budget={train.memory_budget}: {plan['summary']}")
    update = dict(
        batch_size=plan["micro_batch"], grad_accum=plan["grad_accum"],
        activation_checkpointing=plan["activation_checkpointing"], precision=plan["precision"],
    )  # fmt: skip
    return train.model_copy(update=update), plan
