"""``lmforge estimate``: predicted peak memory (and time, and which GPUs fit) without training.

    lmforge estimate --model gpt2_small --batch_size=8 --seq_len=1024 --precision=bf16-mixed
    lmforge estimate --model /models/Llama-2-7b-hf --method=lora --precision=bf16 --json
    lmforge estimate --config llama_350m --fit 24GiB
    lmforge estimate --model llama_tiny --inference --batch_size=4 --seq_len=4096

``--model`` is a preset (``gpt2_small``, ``llama_tiny``, or a shipped pretrain config name), an
lmforge checkpoint or run folder, or a Hugging Face folder / ``config.json``; the model is
described by its config only (built on the meta device, no weights read). Without ``--model``
the model, batch and precision come from a pretrain config (``--config``, default the CPU demo).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import ConfigError, Section, read_yaml, validate_config
from lmforge.models.decoder import DecoderConfig
from lmforge.train.memory_estimate import (
    DEFAULT_MFU,
    GPUS,
    Workload,
    estimate,
    fmt_bytes,
    hardware_table,
    parse_bytes,
)


class EstimateConfig(Section):
    """What ``lmforge estimate`` reads; unset values come from the pretrain config (--config)."""

    model: str | None = Field(
        None, description="preset, lmforge checkpoint, or Hugging Face folder/config.json"
    )
    vocab_size: int | None = Field(None, gt=0, description="override the model's vocabulary size")
    batch_size: int | None = Field(None, gt=0, description="sequences per micro-batch per device")
    seq_len: int | None = Field(None, gt=0, description="tokens per sequence; null = context")
    grad_accum: int | None = Field(None, gt=0, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"] | None = Field(None)
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit", "adagrad", "rmsprop"] | None = None
    method: Literal["full", "lora", "qlora"] = Field("full", description="what trains")
    lora_rank: int = Field(8, gt=0)
    lora_targets: list[str] = Field(["q", "v"], description="of q k v qkv o gate up down fc head")
    checkpointing: Literal["none", "full"] | None = Field(
        None, description="activation checkpointing"
    )
    device: Literal["cpu", "cuda"] = Field("cuda", description="device the breakdown is for")
    world_size: int = Field(1, gt=0, description="devices (data parallel)")
    sharding: Literal["none", "zero1", "zero2", "zero3"] = "none"
    loss_chunks: int = Field(1, gt=0, description="cross-entropy chunks (1 = whole logits)")
    inference: bool = Field(False, description="weights + KV cache instead of training")
    tokens: float | None = Field(None, gt=0, description="token budget for the run-time column")
    mfu: float = Field(DEFAULT_MFU, gt=0, le=1, description="model FLOPs utilisation assumed")
    fit: str | None = Field(None, description="memory budget (e.g. 24GiB): print a fitting plan")
    json_out: bool = Field(False, alias="json", description="print JSON instead of tables")


def load_model_config(spec: str) -> DecoderConfig:
    """A DecoderConfig from a preset, a shipped pretrain config, a checkpoint or an HF config."""
    from lmforge.models import decoder

    if hasattr(decoder, spec) and callable(getattr(decoder, spec)) and not Path(spec).exists():
        return getattr(decoder, spec)()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.name == "config.json" and path.is_file():
        from lmforge.models.hf import config_from_hf

        return config_from_hf(json.loads(path.read_text()), str(path))
    for candidate in (path / "config.yaml", path):
        if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
            data = read_yaml(candidate)
            if "model" in data:
                return validate_config(DecoderConfig, data["model"], str(candidate))
    if path.is_dir():
        from lmforge.train.checkpoint import find_checkpoint

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


def resolve(
    config_file: str | None, overrides: dict[str, Any]
) -> tuple[DecoderConfig, Workload, EstimateConfig]:
    """Estimate options ← a pretrain config (model, batch, precision, optimizer) ← overrides."""
    ours = {k: v for k, v in overrides.items() if k in EstimateConfig.model_fields or k == "json"}
    rest = {k: v for k, v in overrides.items() if k not in ours}
    est = validate_config(EstimateConfig, ours, "command line")
    if est.model:
        if rest:
            raise ConfigError(f"with --model, these options are unknown: {', '.join(rest)}")
        cfg = load_model_config(est.model)
        batch, prec, opt, ga, ac = 1, "bf16-mixed", "adamw", 1, False
    else:
        from lmforge.recipes.pretrain import resolve_config

        pc = resolve_config(config_file, rest)
        cfg = pc.model
        if cfg.vocab_size is None:  # the tokenizer decides it; its target size is known
            cfg = cfg.model_copy(update={"vocab_size": pc.data.vocab_size})
        batch, prec, opt, ga = (
            pc.train.batch_size,
            pc.train.precision,
            pc.optim.name,
            pc.train.grad_accum,
        )
        ac = pc.train.activation_checkpointing
    if est.vocab_size:
        cfg = cfg.model_copy(update={"vocab_size": est.vocab_size})
    if cfg.vocab_size is None:
        raise ConfigError(
            "the model config has no vocab_size (it comes from a tokenizer); set --vocab_size=N"
        )
    w = Workload(
        batch=est.batch_size or batch,
        seq=est.seq_len or cfg.context_length,
        grad_accum=est.grad_accum or ga,
        precision=est.precision or prec,
        optimizer=est.optimizer or opt,
        method=est.method,
        lora_rank=est.lora_rank,
        lora_targets=tuple(est.lora_targets),
        checkpointing=est.checkpointing or ("full" if ac else "none"),
        device=est.device,
        world_size=est.world_size,
        sharding=est.sharding,
        loss_chunks=est.loss_chunks,
        inference=est.inference,
    )
    return cfg, w, est


def run(config_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Compute the report; printing is the CLI's job (``print_report``)."""
    cfg, w, est = resolve(config_file, overrides)
    result = estimate(cfg, w)
    report: dict[str, Any] = {
        "model": {"arch": cfg.arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                  "n_head": cfg.n_head, "n_kv_head": cfg.kv_heads, "vocab_size": cfg.vocab_size},
        "workload": w.__dict__ | {"lora_targets": list(w.lora_targets)},
        "estimate": result.to_dict(),
        "hardware": [] if w.inference else hardware_table(cfg, w, est.tokens, est.mfu),
        "mfu_assumed": est.mfu,
    }  # fmt: skip
    if est.fit:
        from lmforge.train.memory_estimate import plan_fit

        report["plan"] = plan_fit(cfg, w, parse_bytes(est.fit), global_batch=w.batch * w.grad_accum)
    return report


def print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    from rich.console import Console
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
        h = Table(title=f"GPUs (MFU {report['mfu_assumed']:.0%} assumed)")
        for col in ("GPU", "memory", "fits on one", "devices (ZeRO-3)", "s / step", "run (h)"):
            h.add_column(col, justify="right")
        for r in report["hardware"]:
            h.add_row(r["gpu"], f"{r['memory_gib']:.0f} GiB", "yes" if r["fits_one"] else "no",
                      str(r["devices_needed"] or "> 64"), f"{r['step_s']:.3g}",
                      f"{r['run_h']:.3g}" if "run_h" in r else "-")  # fmt: skip
        console.print(h)
    if "plan" in report:
        p = report["plan"]
        console.print(f"[bold]plan[/bold] for {fmt_bytes(p['budget'])}: {p['summary']}")


__all__ = ["EstimateConfig", "GPUS", "load_model_config", "print_report", "resolve", "run"]
