"""``lmforge estimate``: predicted peak memory (and time, and which GPUs fit) without training.

    lmforge estimate --model gpt2_small --batch_size=8 --seq_len=1024 --precision=bf16-mixed
    lmforge estimate --model /models/Llama-2-7b-hf --method=lora --precision=bf16 --json
    lmforge estimate --config llama_350m --fit 24GiB
    lmforge estimate --model llama_tiny --inference --batch_size=4 --seq_len=4096
    lmforge estimate --config llama_350m --calibrate --tokens=1e9
    lmforge estimate --config llama3_8b_qlora --model=Meta-Llama-3-8B/config.json --fit=24GiB

``--model`` is a preset (``gpt2_small``, ``llama_tiny``, or a shipped pretrain config name), an
lmforge checkpoint or run folder, a Hugging Face folder / ``config.json``, or a ``.gguf`` file;
the model is described by its config only (built on the meta device, no weights read).
``--config`` is a pretrain or a fine-tune config (default: the CPU pretrain demo); it gives the
batch, row length, precision, optimizer, checkpointing and, for a fine-tune, the method and
adapters (lora.targets in lmforge's module names) and the model, read from its ``base`` unless
``--model`` is given. ``--fit BUDGET`` prints the plan ``train.memory_budget`` would choose
(``plan/autofit.py``), changing precision or method only as ``--memory_allow`` allows.
``--calibrate`` is the exception: it trains the configured model for a few steps on random
tokens on the present device (``fit``), and the MFU it measures replaces the assumed one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import CONFIG_DIR, Section, read_yaml, resolve_config_path, validate_config
from lmforge.errors import ConfigError
from lmforge.models.decoder import DecoderConfig
from lmforge.plan.estimate import (
    DEFAULT_MFU,
    GPUS,
    Workload,
    estimate,
    fmt_bytes,
    hardware_table,
    lora_terms,
)

RECIPES = ("pretrain", "finetune")  # whose configs --config reads


class EstimateConfig(Section):
    """What ``lmforge estimate`` reads; unset values come from the pretrain or fine-tune config
    (--config), else from the defaults below."""

    model: str | None = Field(
        None, description="preset, lmforge checkpoint, or Hugging Face folder/config.json"
    )
    vocab_size: int | None = Field(None, gt=0, description="override the model's vocabulary size")
    batch_size: int | None = Field(None, gt=0, description="sequences per micro-batch per device")
    seq_len: int | None = Field(None, gt=0, description="tokens per sequence; null = context")
    grad_accum: int | None = Field(None, gt=0, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"] | None = Field(None)
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit", "adagrad", "rmsprop"] | None = None
    method: Literal["full", "lora", "dora", "qlora", "freeze"] | None = Field(
        None, description="what trains; null = the fine-tune config's method, else full"
    )
    lora_rank: int | None = Field(
        None, gt=0, description="LoRA rank; null = the fine-tune config's lora.rank, else 8"
    )
    lora_targets: list[str] | None = Field(
        None,
        description="adapted linears: lmforge module names as in lora.targets (attn.qkv "
        "attn.proj mlp.gate mlp.up mlp.proj mlp.fc lm_head, or suffixes) or q k v qkv o gate up "
        "down fc head; null = the fine-tune config's lora.targets, else [q, v]",
    )
    checkpointing: Literal["none", "selective", "full"] | None = Field(
        None, description="activation checkpointing (selective: matmul outputs kept)"
    )
    device: Literal["cpu", "cuda"] = Field("cuda", description="device the breakdown is for")
    world_size: int = Field(1, gt=0, description="devices (data parallel)")
    sharding: Literal["none", "zero1", "zero2", "zero3"] = "none"
    loss_chunks: int = Field(1, gt=0, description="cross-entropy chunks (1 = whole logits)")
    inference: bool = Field(False, description="weights + KV cache instead of training")
    tokens: float | None = Field(None, gt=0, description="token budget for the run-time column")
    mfu: float = Field(DEFAULT_MFU, gt=0, le=1, description="model FLOPs utilisation assumed")
    calibrate: bool = Field(
        False,
        description="measure the MFU with a short training run of the model on this device "
        "(random weights and tokens) and use it for the time columns",
    )
    calibrate_steps: int = Field(5, gt=0, description="timed steps of the calibration run")
    calibrate_warmup: int = Field(2, ge=1, description="untimed first steps of the calibration")
    fit: str | None = Field(
        None,
        description="memory budget (e.g. 24GiB, or auto = this machine's free device memory): "
        "print the plan memory_budget would choose; null = the config's train.memory_budget",
    )
    memory_allow: list[Literal["precision", "method"]] | None = Field(
        None,
        description="what the --fit plan may also change when nothing fits otherwise; null = "
        "the config's train.memory_allow",
    )
    json_out: bool = Field(False, alias="json", description="print JSON instead of tables")


def load_model_config(spec: str) -> DecoderConfig:
    """A DecoderConfig from a preset, a shipped pretrain config, a checkpoint or run folder, a
    Hugging Face folder or config.json, or a .gguf file (its metadata)."""
    from lmforge.models import decoder

    if hasattr(decoder, spec) and callable(getattr(decoder, spec)) and not Path(spec).exists():
        return getattr(decoder, spec)()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.suffix == ".gguf" and path.is_file():  # the metadata only, no tensor is read
        from lmforge.interop.gguf import gguf_config

        return gguf_config(path)
    if path.name == "config.json" and path.is_file():
        from lmforge.interop.hf import config_from_hf

        return config_from_hf(json.loads(path.read_text()), str(path))
    for candidate in (path / "config.yaml", path):
        if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
            data = read_yaml(candidate)
            if "model" in data:
                return validate_config(DecoderConfig, data["model"], str(candidate))
    if path.is_dir():
        from lmforge.checkpoint.store import find_checkpoint

        ckpt = find_checkpoint(path)
        return load_model_config(str(ckpt / "config.yaml"))
    try:
        from lmforge.config import resolve_config_path

        data = read_yaml(resolve_config_path(spec, "pretrain"))
        return validate_config(DecoderConfig, data["model"], spec)
    except Exception:
        pass
    raise ConfigError(
        f"--model={spec!r}: not a preset (gpt2_small, llama_tiny, a shipped pretrain config), "
        "an lmforge checkpoint/run folder, nor a Hugging Face folder or config.json"
    )


def config_kind(config_file: str) -> tuple[str, Path]:
    """("pretrain" | "finetune", the YAML file) of ``--config``: a file is a fine-tune config when
    its top level has a key only FinetuneConfig has (base, method, lora, ...); a name is looked
    up among the shipped pretrain presets, then the finetune ones."""
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.recipes.pretrain import PretrainConfig

    path = Path(config_file)
    if path.is_file():
        only_finetune = set(FinetuneConfig.model_fields) - set(PretrainConfig.model_fields)
        return ("finetune" if only_finetune & read_yaml(path).keys() else "pretrain"), path
    for recipe in ("pretrain", "finetune"):
        with contextlib.suppress(ConfigError):
            return recipe, resolve_config_path(config_file, recipe)
    presets = {r: sorted(p.stem for p in (CONFIG_DIR / r).glob("*.yaml")) for r in RECIPES}
    raise ConfigError(
        f"--config {config_file}: no such file, and not a shipped preset ("
        + "; ".join(f"{r}: {', '.join(names)}" for r, names in presets.items())
        + ")"
    )


def base_model_config(base: str | None, source: str) -> DecoderConfig:
    """The model config of a fine-tune's ``base`` (lmforge checkpoint or run folder, Hugging
    Face folder or config.json, .gguf metadata), no weights read; null = the demo base."""
    from lmforge.checkpoint.store import find_checkpoint
    from lmforge.errors import CheckpointError
    from lmforge.recipes.finetune import DEMO_BASE_MODEL

    if base is None:  # finetune pretrains this first; its tokenizer has 512 tokens
        return validate_config(DecoderConfig, DEMO_BASE_MODEL | {"vocab_size": 512}, "demo base")
    try:
        path = find_checkpoint(base)  # run folder → its checkpoint; .gguf; pkg:...
    except CheckpointError:
        path = Path(base)  # e.g. a folder holding only config.json
    if not path.exists():
        raise ConfigError(
            f"{source}: base={base!r} does not exist on this machine; estimate reads only the "
            "base's config (config.yaml, config.json or .gguf metadata, no weights): pass "
            "--model=PATH (e.g. the model's config.json) or --base=PATH"
        )
    return load_model_config(str(path))


def resolve(
    config_file: str | None, overrides: dict[str, Any]
) -> tuple[DecoderConfig, Workload, EstimateConfig, str]:
    """Estimate options ← a pretrain or fine-tune config (model, batch, context, precision,
    optimizer, checkpointing, method and adapters, memory budget) ← overrides. Returns the
    model config, the workload, the options (fit / memory_allow filled from the config) and what
    the config was: "pretrain", "finetune" or "model" (``--model`` alone)."""
    from lmforge.plan.autofit import train_workload

    ours = {k: v for k, v in overrides.items() if k in EstimateConfig.model_fields or k == "json"}
    rest = {k: v for k, v in overrides.items() if k not in ours}
    est = validate_config(EstimateConfig, ours, "command line")
    kind, path = config_kind(config_file) if config_file else ("pretrain", None)
    budget, allow = None, []
    if est.model and not config_file:  # the model alone, with defaults for the rest
        if rest:
            raise ConfigError(f"with --model, these options are unknown: {', '.join(rest)}")
        kind, cfg = "model", load_model_config(est.model)
        w = Workload(seq=cfg.context_length, precision="bf16-mixed", device=est.device)
    elif kind == "finetune":
        from lmforge.config import load_config
        from lmforge.recipes.finetune import FinetuneConfig, memory_workload

        fc = load_config(FinetuneConfig, config_file=str(path), overrides=rest, recipe="finetune")
        where = f"{path}{' + command-line overrides' if rest else ''}"
        cfg = load_model_config(est.model) if est.model else base_model_config(fc.base, where)
        try:
            w = memory_workload(fc, cfg, est.device)
        except ValueError as e:  # a lora.targets name the estimator does not know
            raise ConfigError(f"{where}: lora.targets: {e}") from None
        budget, allow = fc.train.memory_budget, fc.train.memory_allow
    else:
        from lmforge.config import load_config
        from lmforge.recipes.pretrain import DEFAULT_PRESET, PretrainConfig

        pc = load_config(
            PretrainConfig,
            config_file=config_file or DEFAULT_PRESET,
            overrides=rest,
            recipe="pretrain",
        )
        cfg = load_model_config(est.model) if est.model else pc.model
        if cfg.vocab_size is None:  # the tokenizer decides it; its target size is known
            cfg = cfg.model_copy(update={"vocab_size": pc.data.vocab_size})
        w = train_workload(pc.train, pc.optim, cfg.context_length, est.device)
        budget, allow = pc.train.memory_budget, pc.train.memory_allow
    if est.vocab_size:
        cfg = cfg.model_copy(update={"vocab_size": est.vocab_size})
    if cfg.vocab_size is None:
        raise ConfigError(
            "the model config has no vocab_size (it comes from a tokenizer); set --vocab_size=N"
        )
    try:
        targets = lora_terms(est.lora_targets) if est.lora_targets is not None else None
    except ValueError as e:
        raise ConfigError(f"--lora_targets: {e}") from None
    given = {
        "batch": est.batch_size, "seq": est.seq_len, "grad_accum": est.grad_accum,
        "precision": est.precision, "optimizer": est.optimizer, "method": est.method,
        "lora_rank": est.lora_rank, "lora_targets": targets, "checkpointing": est.checkpointing,
    }  # fmt: skip
    w = replace(
        w, **{k: v for k, v in given.items() if v is not None}, world_size=est.world_size,
        sharding=est.sharding, loss_chunks=est.loss_chunks, inference=est.inference,
    )  # fmt: skip
    est = est.model_copy(
        update={"fit": est.fit or budget, "memory_allow": est.memory_allow or allow}
    )
    return cfg, w, est, kind


def calibrate_mfu(
    cfg: DecoderConfig, w: Workload, steps: int = 5, warmup: int = 2, device: str = "auto"
) -> dict[str, Any]:
    """Measured model FLOPs utilisation of ``fit`` on the present device: ``warmup + steps``
    optimizer steps of ``cfg`` (random init, random tokens, micro-batch/accumulation/precision/
    checkpointing of ``w``, full fine-tune with the workload's optimizer); the first ``warmup``
    steps (allocation, kernel selection) are not timed. MFU = mean tokens/s of the timed steps x
    FLOPs/token (``flops_per_token``, the formula of the time columns) / the device's peak
    (``train.device.peak_flops``: data sheet on CUDA, a measured matmul on CPU)."""
    import tempfile

    import numpy as np
    import torch

    from lmforge.data.loader import TokenBatches
    from lmforge.models.decoder import Decoder
    from lmforge.plan.estimate import flops_per_token
    from lmforge.train.device import peak_flops, resolve_device
    from lmforge.train.loop import TrainConfig, fit
    from lmforge.train.lr_schedule import SchedConfig
    from lmforge.train.optim import OptimConfig, build_optimizer

    dev = resolve_device(device)
    peak, source = peak_flops(dev, w.precision)
    if not peak:
        raise ConfigError(f"--calibrate: {source}; give --mfu instead")
    torch.manual_seed(0)
    seq = min(w.seq, cfg.context_length)
    model = Decoder(cfg.model_copy(update={"dropout": 0.0}))
    model = model.to(dev, torch.bfloat16 if w.precision == "bf16" else torch.float32)
    name = w.optimizer if w.optimizer in ("adamw", "adam", "sgd", "adagrad", "rmsprop") else "adamw"
    optimizer = build_optimizer(model, OptimConfig(name=name))
    n = (warmup + steps) * w.batch * w.grad_accum * (seq + 1) + seq + 1
    dtype = np.uint16 if (cfg.vocab_size or 0) <= 2**16 else np.int64
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, n).astype(dtype)
    train = TrainConfig(
        max_steps=warmup + steps, batch_size=w.batch, grad_accum=w.grad_accum,
        precision=w.precision, activation_checkpointing=w.checkpointing,
        log_every=1, eval_every=10**9, save_every=10**9, device=str(dev), oom_recovery=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmforge-calibrate-") as tmp:
        fit(
            model, optimizer, TokenBatches(tokens, seq, w.batch, seed=0), train,
            peak_lr=1e-4, sched=SchedConfig(warmup_steps=0), run_dir=Path(tmp), device=dev,
            checkpoint_files={"config.yaml": "calibration: true\n"},
        )  # fmt: skip
        events = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    # with log_every=1 each train event's tokens_per_s covers exactly its own step
    timed = [e["tokens_per_s"] for e in events if "loss" in e and e["step"] > warmup]
    tokens_per_s = sum(timed) / len(timed)
    fpt = flops_per_token(cfg, seq, w.checkpointing)
    return dict(
        mfu=tokens_per_s * fpt / peak, tokens_per_s=tokens_per_s, flops_per_token=fpt,
        peak_flops=peak, peak_flops_source=source, device=str(dev), steps=steps, warmup=warmup,
    )  # fmt: skip


def run(config_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Compute the report; printing is the CLI's job (``print_report``)."""
    cfg, w, est, kind = resolve(config_file, overrides)
    result = estimate(cfg, w)
    mfu = est.mfu
    calibration = None
    if est.calibrate and not w.inference:
        calibration = calibrate_mfu(cfg, w, est.calibrate_steps, est.calibrate_warmup)
        mfu = calibration["mfu"]
    report: dict[str, Any] = {
        "model": {"arch": cfg.arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                  "n_head": cfg.n_head, "n_kv_head": cfg.kv_heads, "vocab_size": cfg.vocab_size},
        "workload": w.__dict__ | {"lora_targets": list(w.lora_targets)},
        "estimate": result.to_dict(),
        "hardware": [] if w.inference else hardware_table(cfg, w, est.tokens, mfu),
        "mfu_assumed": est.mfu,
        "mfu": mfu,  # what the time columns use
        "mfu_source": "measured" if calibration is not None else "assumed",
    }  # fmt: skip
    if calibration is not None:
        report["calibration"] = calibration
    if est.fit:  # what train.memory_budget would choose (plan.autofit.apply_memory_budget)
        from lmforge.plan.autofit import budget_bytes, plan_fit

        allow = est.memory_allow or []
        could = ("precision",) if kind == "pretrain" else ("precision", "method")
        if "method" in allow and kind == "pretrain":
            raise ConfigError(
                "memory_allow: 'method' applies to fine-tune configs, not pretraining"
            )
        report["plan"] = plan_fit(
            cfg, w, budget_bytes(est.fit, w.device), w.batch * w.grad_accum, allow=allow,
            could_allow=could,
        )  # fmt: skip
    return report


def print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    e, w = report["estimate"], report["workload"]
    title = (
        f"predicted peak per device: {fmt_bytes(e['peak'])} ({e['phase']}) — "
        f"{w['method']}, {w['precision']}, batch {w['batch']} x {w['seq']}, {w['optimizer']}"
    )
    t = Table(title=title)
    t.add_column("component")
    t.add_column("live at peak", justify="right")
    t.add_column("full size", justify="right")
    names = list(dict.fromkeys([*e["components"], *e["all_components"]]))
    for k in names:
        live, full = e["components"].get(k), e["all_components"].get(k)
        t.add_row(k, fmt_bytes(live) if live is not None else "-", fmt_bytes(full) if full else "")
    t.add_row(
        "[bold]peak (live tensors = CUDA max_memory_allocated)[/bold]",
        f"[bold]{fmt_bytes(e['peak'])}[/bold]",
        "",
    )
    if e["runtime_overhead"]:
        t.add_row("runtime overhead (CUDA context, NCCL)", fmt_bytes(e["runtime_overhead"]), "")
    t.add_row("activations per layer", fmt_bytes(e["per_layer_activation"]), "")
    t.add_row("CPU peak while loading", fmt_bytes(e["cpu_load_peak"]), "")
    console.print(t)
    for note in e["notes"]:
        console.print(f"  note: {note}")
    if report["hardware"]:
        if "calibration" in report:
            c = report["calibration"]
            how = f"measured on {c['device']}, {c['tokens_per_s']:,.0f} tok/s"
        else:
            how = "assumed"
        h = Table(title=f"GPUs (MFU {report['mfu']:.2%} {how})")
        for col in ("GPU", "memory", "fits on one", "devices (ZeRO-3)", "s / step", "run (h)"):
            h.add_column(col, justify="right")
        for r in report["hardware"]:
            h.add_row(r["gpu"], f"{r['memory_gib']:.0f} GiB", "yes" if r["fits_one"] else "no",
                      str(r["devices_needed"] or "> 64"), f"{r['step_s']:.3g}",
                      f"{r['run_h']:.3g}" if "run_h" in r else "-")  # fmt: skip
        console.print(h)
    if "plan" in report:
        p = report["plan"]
        console.print(
            f"[bold]plan[/bold] for {fmt_bytes(p['budget'])}: {escape(p['summary'])}",
            style=None if p["fits"] else "red",
            highlight=False,
        )


__all__ = ["EstimateConfig", "GPUS", "load_model_config", "print_report", "resolve", "run"]
