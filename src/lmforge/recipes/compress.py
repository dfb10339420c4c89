"""``lmforge compress quantize`` and ``lmforge compress prune``: a smaller checkpoint folder,
with what it saved and what it cost in quality measured on the same data before and after.

    lmforge compress quantize --checkpoint runs/pretrain-… --out_dir q8 --method int8-weight-only
    lmforge compress prune --checkpoint runs/pretrain-… --out_dir p50 --method structured --amount 0.5

The output loads wherever a checkpoint is accepted (``lmforge generate``, ``eval``, ``serve``,
``lmforge.load``); ``compression.json`` in it holds the report the command prints.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from lmforge.checkpoint.load import load
from lmforge.compress.folder import check_out_dir, float_bytes, write_compressed, write_report
from lmforge.compress.measure import (
    ExactMatchConfig,
    count_params,
    default_data,
    deltas,
    quality,
    weights_bytes,
)
from lmforge.compress.quantize import is_quantized, quantize_model
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

KINDS = ("decoder", "sequence-classifier")


class QuantizeConfig(Section):
    checkpoint: str = Field(
        description="checkpoint, run folder (its latest checkpoint), Hugging Face folder or .gguf "
        "file: a decoder or a sequence classifier"
    )
    out_dir: str = Field(description="folder to write the quantized checkpoint to; new or empty")
    method: Literal["int8-dynamic", "int8-weight-only", "int4-weight-only"] = Field(
        "int8-weight-only",
        description="int8-dynamic: int8 weights and per-token int8 activations; int8-weight-only: "
        "int8 weights per output channel; int4-weight-only: int4 weights in groups (group_size)",
    )
    group_size: int = Field(32, description="int4: input channels per scale (32, 64, 128 or 256)")
    data: str | None = Field(
        None,
        description="quality is measured on it before and after: a decoder's UTF-8 text (its "
        "held-out tail, max_eval_bytes), a classifier's labelled file; null = the shipped "
        "TinyShakespeare / support-ticket test set",
    )
    max_eval_bytes: int = Field(
        100_000, gt=0, description="decoders: bytes at the end of data that are scored"
    )
    exact_match: ExactMatchConfig = Field(
        ExactMatchConfig(), description="a chat decoder's exact match, measured before and after"
    )
    num_threads: int | None = Field(None, gt=0, description="CPU threads; null = torch's default")


def _load_source(checkpoint: str, num_threads: int | None) -> Any:
    if num_threads:
        torch.set_num_threads(num_threads)
    loaded = load(checkpoint, torch.device("cpu"), expect=KINDS)
    if is_quantized(loaded.model) or loaded.manifest.quantization:
        raise CheckpointError(
            f"{loaded.manifest.path} is already quantized ({loaded.manifest.quantization}); "
            "compress its float source instead"
        )
    return loaded


def quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Load, measure, quantize, measure again, write; returns the report (compression.json)."""
    out = Path(cfg.out_dir)
    check_out_dir(out)
    if cfg.method == "int4-weight-only" and cfg.group_size not in (32, 64, 128, 256):
        raise ConfigError(f"group_size: {cfg.group_size} is not one of 32, 64, 128, 256")
    model, tokenizer, manifest = _load_source(cfg.checkpoint, cfg.num_threads)
    data = cfg.data or default_data(manifest)
    t0 = time.perf_counter()
    before = quality(model, tokenizer, manifest, data, cfg.max_eval_bytes, cfg.exact_match)
    size_before = float_bytes(model)
    names = quantize_model(model, cfg.method, cfg.group_size)
    after = quality(model, tokenizer, manifest, data, cfg.max_eval_bytes, cfg.exact_match)
    report: dict[str, Any] = {
        "step": "quantize",
        "method": cfg.method,
        "group_size": cfg.group_size if cfg.method == "int4-weight-only" else None,
        "library": _torchao_version(),
        "source": str(manifest.path),
        "quantized_layers": len(names),
        "kept_float": "embeddings, norms, tied output head, layers whose width is not a "
        "multiple of group_size (int4)",
        "data": data,
        "quality": deltas(before, after),
        "bytes_before": size_before,
        "parameters": count_params(model),
        "seconds": 0.0,
    }
    write_compressed(model, tokenizer, manifest, out, quantization=cfg.method)
    report["bytes_after"] = weights_bytes(out)
    report["seconds"] = time.perf_counter() - t0
    write_report(out, report)
    return {"out_dir": str(out), **report}


def _torchao_version() -> str:
    from importlib.metadata import version

    return f"torchao {version('torchao')}"


class PruneConfig(Section):
    checkpoint: str = Field(
        description="checkpoint, run folder (its latest checkpoint), Hugging Face folder or .gguf "
        "file: a decoder (any method) or a sequence classifier (magnitude methods)"
    )
    out_dir: str = Field(description="folder to write the pruned checkpoint to; new or empty")
    method: Literal["structured", "magnitude-global", "magnitude-layer"] = Field(
        "structured",
        description="structured: remove attention heads (kv groups) and MLP channels, a smaller "
        "model; magnitude-global / magnitude-layer: zero the smallest weights, ranked over all "
        "linear layers together / within each layer",
    )
    amount: float = Field(
        0.5, ge=0, lt=1, description="fraction pruned: of the weights (magnitude), of each "
        "block's heads and MLP channels (structured)",
    )  # fmt: skip
    heads: float | None = Field(
        None, ge=0, lt=1, description="structured: fraction of heads removed; null = amount"
    )
    channels: float | None = Field(
        None, ge=0, lt=1, description="structured: fraction of MLP channels removed; null = amount"
    )
    importance: Literal["taylor", "magnitude"] = Field(
        "taylor",
        description="structured: taylor = |gradient of the loss w.r.t. a gate on the unit| over "
        "calibration text; magnitude = norms of the unit's weights (no data)",
    )
    data: str | None = Field(
        None,
        description="decoders: UTF-8 text whose held-out tail (max_eval_bytes) measures quality "
        "and whose rest calibrates and recovers; classifiers: a labelled file; null = shipped",
    )
    max_eval_bytes: int = Field(100_000, gt=0, description="decoders: bytes of data scored")
    exact_match: ExactMatchConfig = Field(
        ExactMatchConfig(), description="a chat decoder's exact match, measured before and after"
    )
    calibration_batches: int = Field(8, gt=0, description="taylor: batches of calibration text")
    batch_size: int = Field(8, gt=0, description="sequences per calibration / recovery batch")
    context: int = Field(128, gt=1, description="tokens per calibration / recovery sequence")
    sweep: list[float] = Field(
        [], description="amounts to try (e.g. [0,0.1,...,0.9]): quality of each → sweep.json "
        "and plots/sparsity.png in out_dir",
    )  # fmt: skip
    recover_steps: int = Field(
        0, ge=0, description="decoders: fine-tune steps after pruning (0 = none); zeros stay zero"
    )
    recover_lr: float = Field(3e-4, gt=0, description="recovery fine-tune peak learning rate")
    seed: int = Field(0, ge=0, description="seed of calibration and recovery batches")
    num_threads: int | None = Field(None, gt=0, description="CPU threads; null = torch's default")

    @field_validator("sweep")
    @classmethod
    def _amounts(cls, v: list[float]) -> list[float]:
        if bad := [a for a in v if not 0 <= a < 1]:
            raise ValueError(f"amounts must be in [0, 1), got {bad}")
        return v


def prune(cfg: PruneConfig) -> dict[str, Any]:
    """Load, measure, prune (sweep first if asked), measure, recover, measure; write."""
    import copy

    from lmforge.compress import prune as pr

    out = Path(cfg.out_dir)
    check_out_dir(out)
    model, tokenizer, manifest = _load_source(cfg.checkpoint, cfg.num_threads)
    decoder = manifest.kind == "decoder"
    if not decoder and (cfg.method == "structured" or cfg.recover_steps):
        raise ConfigError(
            f"{manifest.path} is a {manifest.kind}: structured pruning and the recovery "
            "fine-tune are for decoders; use --method=magnitude-global or magnitude-layer and "
            "--recover_steps=0"
        )
    data = cfg.data or default_data(manifest)
    if decoder and cfg.context > model.cfg.context_length:  # calibration windows must fit
        cfg = cfg.model_copy(update={"context": model.cfg.context_length})
    t0 = time.perf_counter()
    before = quality(model, tokenizer, manifest, data, cfg.max_eval_bytes, cfg.exact_match)
    size_before, params_before = float_bytes(model), count_params(model)
    calib = _calibration_tokens(tokenizer, data, cfg) if decoder else None
    scores = None
    if cfg.method == "structured":
        batches = _calibration_batches(calib, cfg) if cfg.importance == "taylor" else None
        scores = pr.taylor_scores(model, batches) if batches else pr.magnitude_scores(model)

    def pruned(amount: float) -> torch.nn.Module:
        if cfg.method == "structured":
            heads = cfg.heads if cfg.heads is not None else amount
            channels = cfg.channels if cfg.channels is not None else amount
            return pr.prune_structured(model, heads, channels, scores)
        m = copy.deepcopy(model)
        pr.prune_unstructured(m, amount, "global" if cfg.method == "magnitude-global" else "layer")
        return m

    sweep = []
    for amount in cfg.sweep:
        m = pruned(amount)
        sweep.append({"amount": amount, "parameters": count_params(m), "sparsity": pr.sparsity(m),
                      **quality(m, tokenizer, manifest, data, cfg.max_eval_bytes,
                                cfg.exact_match)})  # fmt: skip
        log.info("sweep: amount %.2f → %s", amount, sweep[-1])
    small = pruned(cfg.amount)
    after = quality(small, tokenizer, manifest, data, cfg.max_eval_bytes, cfg.exact_match)
    report: dict[str, Any] = {
        "step": "prune",
        "method": cfg.method,
        "amount": cfg.amount,
        "importance": cfg.importance if cfg.method == "structured" else "|weight|",
        "source": str(manifest.path),
        "data": data,
        "parameters_before": params_before,
        "parameters_after": count_params(small),
        "sparsity_after": pr.sparsity(small),
        "layers": [s.model_dump() for s in small.cfg.layers]
        if cfg.method == "structured"
        else None,
        "quality": deltas(before, after),
        "bytes_before": size_before,
    }
    if cfg.recover_steps:
        report["recovery"] = _recover(small, calib, cfg, out)
        recovered = quality(small, tokenizer, manifest, data, cfg.max_eval_bytes, cfg.exact_match)
        report["quality_after_recovery"] = deltas(before, recovered)
    write_compressed(small, tokenizer, manifest, out)
    report["bytes_after"] = weights_bytes(out)
    if sweep:
        report["sweep"] = sweep
        report["sweep_plot"] = str(_plot_sweep(sweep, before, out, cfg.method))
    report["seconds"] = time.perf_counter() - t0
    write_report(out, report)
    return {"out_dir": str(out), **report}


def _calibration_tokens(tokenizer: Any, data: str, cfg: PruneConfig) -> Any:
    """Token ids of ``data`` without its held-out tail (so nothing scored is trained on)."""
    import numpy as np

    from lmforge.compress.measure import held_out, read_text

    text = read_text(data)
    rest = text[: len(text) - len(held_out(text, cfg.max_eval_bytes))]
    ids = np.asarray(tokenizer.encode(rest).ids, dtype=np.int64)
    if len(ids) < cfg.context + 1:
        raise ConfigError(
            f"data: {data} has {len(ids)} tokens before its held-out tail of "
            f"{cfg.max_eval_bytes} bytes; calibration needs at least context + 1 = "
            f"{cfg.context + 1} (use a longer text or a smaller --max_eval_bytes)"
        )
    return ids


def _calibration_batches(tokens: Any, cfg: PruneConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from lmforge.data.loader import TokenBatches

    batches = TokenBatches(tokens, cfg.context, cfg.batch_size, seed=cfg.seed)
    return [batches.next_batch() for _ in range(cfg.calibration_batches)]


def _recover(model: torch.nn.Module, tokens: Any, cfg: PruneConfig, out: Path) -> dict[str, Any]:
    """Fine-tune the pruned model in place on the calibration text; pruned weights stay zero
    (torch's pruning masks are on during the fine-tune, removed after)."""
    import shutil
    import tempfile

    from lmforge.compress import prune as pr
    from lmforge.compress.short_fit import fit_on_tokens
    from lmforge.train.loop import TrainConfig
    from lmforge.train.lr_schedule import SchedConfig
    from lmforge.train.optim import OptimConfig

    if cfg.method != "structured":
        pr.freeze_zeros(model)
    steps = cfg.recover_steps
    train = TrainConfig(max_steps=steps, batch_size=cfg.batch_size, eval_every=steps,
                        save_every=steps, keep_last=1, log_every=max(1, steps // 10),
                        seed=cfg.seed, device="cpu")  # fmt: skip
    sched = SchedConfig(name="cosine", warmup_steps=max(1, steps // 10))
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        result = fit_on_tokens(model, tokens, Path(tmp), train, OptimConfig(lr=cfg.recover_lr),
                               sched, cfg.context)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "metrics.jsonl", out / "recovery_metrics.jsonl")
    pr.remove_masks(model)
    model.eval()
    return {"steps": result.step, "lr": cfg.recover_lr, "tokens_per_s": result.tokens_per_s,
            "metrics": "recovery_metrics.jsonl"}  # fmt: skip


def _plot_sweep(
    sweep: list[dict[str, Any]], before: dict[str, float], out: Path, method: str
) -> Path:
    """plots/sparsity.png: each quality metric against the amount pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in ("val_bpb", "exact_match", "accuracy", "f1_macro") if k in before]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    xs = [100 * p["amount"] for p in sweep]
    for ax, k in zip(axes[0], metrics, strict=True):
        ax.plot(xs, [p[k] for p in sweep], marker="o", label="pruned")
        ax.axhline(before[k], color="grey", linestyle="--", label="unpruned")
        ax.set_xlabel("% of heads and MLP channels removed" if method == "structured"
                      else "% of linear weights zeroed")  # fmt: skip
        ax.set_ylabel(k)
        ax.legend()
    fig.suptitle(f"quality vs sparsity ({method})")
    fig.tight_layout()
    path = out / "plots" / "sparsity.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
