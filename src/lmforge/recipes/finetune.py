"""``lmforge finetune``: a base checkpoint + instruction data → a fine-tuned model, forgetting measured.

Read top to bottom: resolve the config, set up the run folder, get the base (with no
``--base``: pretrain a small one first on the instruction suite's plain text, saying so), load
the chat template, build the SFT data, score exact match (and the retained data) before,
do the surgery the method needs (full, lora, dora, qlora, freeze), fit with the forgetting
penalties, score after, save adapters and the merged model, print a summary.

Run folder: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (resumable, with adapters as
trained), ``adapter/`` (PEFT format, loads onto ``lmforge export --format hf`` of the base),
``model/`` (the merged, self-describing checkpoint for ``lmforge chat``/``generate``/``export``;
not for qlora, whose base is NF4: merge its adapter into the full-precision base with
``lmforge merge``), ``summary.json``. Under bf16-mixed, LoRA trains on a bf16 copy of the
frozen base (``bf16_frozen_base``: the same matmuls) and its ``model/`` is merged into the
base re-read from disk; evaluation runs under autocast.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from lmforge import runs
from lmforge.checkpoint.load import load
from lmforge.checkpoint.model_folder import merged_model, write_model_folder
from lmforge.checkpoint.store import load_weights
from lmforge.config import Section, to_yaml
from lmforge.data.augment import (
    AugmentConfig,
    add_neftune,
    augment_conversations,
    embedding_synonyms,
)
from lmforge.data.chat_template import ChatFormat
from lmforge.data.conversations import read_conversations
from lmforge.data.instructions import FAMILIES, make_suite
from lmforge.data.loader import BatchSource, TokenBatches
from lmforge.data.sft import (
    MixedBatches,
    SFTBatches,
    SFTDataConfig,
    encode_examples,
)
from lmforge.data.tokenizer import pad_id
from lmforge.errors import ConfigError
from lmforge.eval.generation import exact_match_eval, qa_pairs
from lmforge.eval.metrics import final_number_match, stripped_match
from lmforge.eval.retained import Retained, forgetting
from lmforge.interop.peft import save_adapter
from lmforge.models.decoder import DecoderConfig, token_loss_sum
from lmforge.models.linear_cross_entropy import head_in_loss
from lmforge.models.lora import (
    LoraConfig,
    Method,
    bf16_frozen_base,
    prepare_model,
    trainable_report,
)
from lmforge.recipes.demo_base import DemoBaseConfig, demo_base
from lmforge.train import distributed
from lmforge.train.device import setup_device
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.precision import autocast, weight_dtype
from lmforge.train.regularizers import combine, ewc_penalty, fisher_diagonal, l2sp_penalty

log = logging.getLogger(__name__)


class SuiteConfig(Section):
    """The shipped synthetic instruction suite (used when data.path is null)."""

    families: list[str] = Field(
        ["sort", "add", "reverse"], description=f"task families, of: {', '.join(FAMILIES)}"
    )
    n_per_family: int = Field(600, gt=0, description="examples per family (train + held out)")
    seed: int = Field(0, description="generator seed")


class RetainConfig(Section):
    """Catastrophic forgetting: what must be kept, and how."""

    path: str | None = Field(
        None,
        description="a .txt corpus (metric: bpb) or an earlier task's .jsonl (metric: exact match)",
    )
    n_eval: int = Field(60, gt=0, description="retained SFT records scored by exact match")
    max_chars: int = Field(20_000, gt=0, description="characters of a retained text corpus used")
    replay_rows: int = Field(
        0, ge=0, description="rows of retained SFT data mixed into every batch"
    )
    ewc_lambda: float = Field(0.0, ge=0, description="EWC penalty weight λ (0 = off)")
    l2sp_lambda: float = Field(
        0.0, ge=0, description="L2-SP pull to the start weights, λ (0 = off)"
    )
    fisher_batches: int = Field(8, gt=0, description="retained batches for EWC's Fisher estimate")


class FinetuneConfig(Section):
    """Everything ``lmforge finetune`` reads. With no --config: LoRA on the shipped suite."""

    base: str | None = Field(
        None,
        description="base checkpoint (lmforge run/checkpoint, Hugging Face folder, .gguf); "
        "null = pretrain a small demo base first",
    )
    method: Method = Field("lora", description="full, lora, dora, qlora or freeze")
    lora: LoraConfig = LoraConfig()
    data: SFTDataConfig = SFTDataConfig()
    suite: SuiteConfig = SuiteConfig()
    retain: RetainConfig = RetainConfig()
    demo_base: DemoBaseConfig = DemoBaseConfig()
    context_length: int | None = Field(
        None, gt=0, description="tokens per training row; null = min(model context, 512)"
    )
    n_eval: int = Field(60, gt=0, description="held-out prompts scored by exact match")
    max_new_tokens: int = Field(16, gt=0, description="tokens generated per scored answer")
    score: Literal["exact", "final_number"] = Field(
        "exact",
        description="how an answer is scored: exact (whole answer, stripped) or final_number "
        "(the number after #### or the last number, as GSM8K)",
    )
    n_samples: int = Field(4, ge=0, description="sample answers printed at the end")
    augment: AugmentConfig = Field(
        AugmentConfig(), description="EDA copies of the training conversations' user turns"
    )
    neftune_alpha: float = Field(
        0.0, ge=0, description="NEFTune: uniform noise α/√(L·d) on the token embeddings while "
        "training (the paper uses 5); 0 = off",
    )  # fmt: skip
    train: TrainConfig = TrainConfig(
        max_steps=1000, batch_size=16, eval_every=500, save_every=500, log_every=10, num_threads=2
    )
    optim: OptimConfig = OptimConfig(lr=3e-3, weight_decay=0.0)
    sched: SchedConfig = SchedConfig(warmup_steps=10)
    dist: DistConfig = DistConfig()
    out_dir: str | None = Field(None, description="run folder; null = runs/finetune-<date>-<time>")
    resume: str | None = Field(
        None,
        description="a checkpoint or run folder of this run to continue from (in that folder, "
        "with its config.yaml when no --config is given)",
    )

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        check_warmup(self.sched, self.train.max_steps)
        if self.retain.path is None and (
            self.retain.replay_rows or self.retain.ewc_lambda or self.retain.l2sp_lambda
        ):
            raise ValueError("retain.replay_rows/ewc_lambda/l2sp_lambda need retain.path")
        return self

    def row_length(self, model_cfg: DecoderConfig) -> int:
        """Tokens per training row: ``context_length``, else min(the model's context, 512)."""
        return self.context_length or min(model_cfg.context_length, 512)


def _suite_records(cfg: FinetuneConfig) -> tuple[list, list[str]]:
    ex = make_suite(cfg.suite.families, cfg.suite.n_per_family, seed=cfg.suite.seed)
    convs = [
        [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]
        for e in ex
    ]
    return convs, [e["family"] for e in ex]


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the whole fine-tune; returns the summary also written to ``summary.json``."""
    t_start = time.perf_counter()
    device = setup_device(cfg.train.device, cfg.train.num_threads, cfg.train.precision)
    par = distributed.setup(cfg.dist, device, "finetune")
    try:
        _check_layout(cfg, par)
        run = runs.start("finetune", cfg.out_dir, cfg.resume, par)
        with runs.failure_note(run):
            return _finetune(cfg, run, t_start)
    finally:
        distributed.teardown(par)


def _check_layout(cfg: FinetuneConfig, par: distributed.Parallel) -> None:
    """The distributed layouts each method can run under (ConfigError otherwise)."""
    if not par.active:
        return
    if cfg.method == "qlora" and par.device.type != "cuda":
        raise ConfigError(
            "method=qlora runs in one process on the CPU: bitsandbytes' NF4 weights cannot be "
            "replicated or sharded over gloo; drop --nproc, or use method=lora under ddp"
        )
    sharded = ("fsdp",) if cfg.method in ("full", "freeze") else ()
    distributed.require_strategy(par, ("ddp", *sharded), f"finetune method={cfg.method}")


def _finetune(cfg: FinetuneConfig, run: runs.Run, t_start: float) -> dict[str, Any]:
    par, run_dir, device = run.par, run.dir, run.par.device
    runs.write_config(run, cfg)

    # Base model, tokenizer and chat template.
    base = cfg.base or str(demo_base(run_dir, cfg))
    model, tokenizer, manifest = load(base, device, expect="decoder")
    base_ckpt = manifest.path
    fmt = ChatFormat.for_checkpoint(base_ckpt, tokenizer)
    log.info("base %s; chat template: %s", base_ckpt, fmt.source)
    context = cfg.row_length(model.cfg)
    if cfg.train.memory_budget:  # micro-batch, accumulation, checkpointing (+ allowed changes)
        from lmforge.plan.autofit import apply_memory_budget, finetune_workload

        w = finetune_workload(cfg, model.cfg, device.type)
        train, plan = apply_memory_budget(cfg.train, w, model.cfg, device.type, run_dir, True)
        cfg = cfg.model_copy(update={"train": train, "method": plan["method"]})
        _check_layout(cfg, par)  # the plan may have changed the method
        runs.write_config(run, cfg)  # the values that run
    model.to(dtype=weight_dtype(cfg.train.precision))  # pure bf16: bf16 weights (and adapters)

    # Data: records → held-out prompts for exact match + training examples.
    if cfg.data.path:
        convs, problems = read_conversations(cfg.data.path, cfg.data.format, cfg.data.on_error)
        families = None
    else:
        (convs, families), problems = _suite_records(cfg), []
    if problems:
        log.warning("skipped %d bad records, e.g. %s", len(problems), problems[0])
    if cfg.data.eval_path:  # a separate test split: every training record is used
        eval_convs, _ = read_conversations(cfg.data.eval_path, cfg.data.format, cfg.data.on_error)
        eval_pairs, train_convs = qa_pairs(eval_convs[: cfg.n_eval]), convs
    else:
        n_val = min(cfg.n_eval, max(1, int(len(convs) * cfg.data.val_fraction)))
        eval_pairs = qa_pairs(convs[:n_val], families[:n_val] if families else None)
        train_convs = convs[n_val:]
    if cfg.augment.copies:  # EDA on the user turns; synonyms from the model's own embeddings
        a = cfg.augment
        words = {w.strip(".,!?;:\"'()") for c in train_convs for m in c if m["role"] == "user"
                 for w in m["content"].split()}  # fmt: skip
        synonyms = embedding_synonyms(words, tokenizer, model.tok_emb.weight, a.neighbours,
                                      a.min_similarity)  # fmt: skip
        train_convs = train_convs + augment_conversations(train_convs, synonyms, a, cfg.train.seed)
        log.info("augment: %d training conversations; synonyms for %d words",
                 len(train_convs), len(synonyms))  # fmt: skip
    match = final_number_match if cfg.score == "final_number" else stripped_match
    examples, stats = encode_examples(
        train_convs, fmt, context, cfg.data.train_on_prompt, cfg.data.truncation
    )
    # every rank draws the global micro-batch and keeps its rows (distributed.RankRows): n
    # ranks with micro-batch b train on exactly the rows one process does with n x b
    dp = par.dp_size
    batches: BatchSource = SFTBatches(
        examples,
        context,
        cfg.train.batch_size * dp,
        cfg.train.seed,
        pad_id=_pad(tokenizer),
        pack=cfg.data.pack,
        stats=stats,
    )

    retained = (
        Retained.load(cfg.retain.path, fmt, cfg.retain.n_eval, cfg.retain.max_chars)
        if cfg.retain.path
        else None
    )

    last_eval: dict[str, Any] = {}

    # Surgery first: "before" scores the model as training starts (LoRA's B = 0 leaves the
    # base's function unchanged; QLoRA's base is then the NF4 one it trains on).
    torch.manual_seed(cfg.train.seed)  # adapter init: the same on every rank and on resume
    model = prepare_model(model, cfg.method, cfg.lora)
    model.to(device)
    bf16_base = cfg.method == "lora" and cfg.train.precision == "bf16-mixed"
    if bf16_base:
        # autocast casts the frozen weights to bf16 at every forward anyway: store them so
        # (same numerics, half their memory, no casts). Such a model runs only under autocast.
        bf16_frozen_base(model)
    # Generation stays fp32 unless the base is bf16: under autocast every decoding step would
    # cast every fp32 weight again (measured: SmolLM2, 32 tokens, 2.6x slower).
    in_precision = (lambda: autocast(cfg.train.precision, device)) if bf16_base else nullcontext

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size  # prompts generated together

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        with in_precision():
            out, preds = exact_match_eval(m, fmt, eval_pairs, cfg.max_new_tokens, match, eval_bs)
            if retained is not None:
                out |= retained.metrics(m, fmt, device, eval_bs)
        last_eval.update(out=out, preds=preds)
        return out

    score = distributed.evaluator(par, evaluate)  # rank 0 scores, or all in lockstep (fsdp)
    before = score(model)
    last_eval.clear()  # "after" may reuse only an evaluation of trained weights
    log.info("before: %s", before)

    # Penalties, replay.
    report = trainable_report(model)
    log.info(
        "trainable parameters: %s of %s (%.2f%%)",
        f"{report['trainable']:,}",
        f"{report['total']:,}",
        report["trainable_pct"],
    )
    regularizer = None
    if retained is not None:
        retain_batches = _retain_source(retained, fmt, context, cfg, tokenizer)
        if cfg.retain.ewc_lambda:
            source = _retain_source(
                retained, fmt, context, cfg, tokenizer, batch_size=cfg.train.batch_size
            )
            with in_precision():
                fisher = fisher_diagonal(
                    model, [source.next_batch() for _ in range(cfg.retain.fisher_batches)], device
                )
            regularizer = ewc_penalty(model, fisher, cfg.retain.ewc_lambda)
        if cfg.retain.l2sp_lambda:
            regularizer = combine(regularizer, l2sp_penalty(model, cfg.retain.l2sp_lambda))
        if cfg.retain.replay_rows:  # replay_rows per rank, as batch_size
            batches = MixedBatches(batches, retain_batches, cfg.retain.replay_rows * dp)
    batches = distributed.shard_batches(batches, par)
    resume_ckpt = run.resume_from
    if resume_ckpt is not None:
        load_weights(model, resume_ckpt)
    plain = model
    if cfg.neftune_alpha > 0:
        add_neftune(plain.tok_emb, cfg.neftune_alpha)  # training mode only: scoring is clean
    model = distributed.parallelize(model, par, cfg.dist, cfg.train.precision)
    optimizer = build_optimizer(plain, cfg.optim)  # after sharding: on the sharded parameters

    # The head is applied inside the loss, chunk by chunk: no (tokens, vocab) logits
    # (models/linear_cross_entropy.py). One process only: DDP/FSDP wrap the head themselves.
    with nullcontext() if par.active else head_in_loss(plain) as head_loss:
        result = fit(
            model,
            optimizer,
            batches,
            cfg.train,
            peak_lr=cfg.optim.lr,
            sched=cfg.sched,
            run_dir=run_dir,
            device=device,
            checkpoint_files={"config.yaml": to_yaml(cfg)},
            resume_from=resume_ckpt,
            regularizer=regularizer,
            evaluate=score,
            parallel=par,
            loss_fn=head_loss or token_loss_sum,
        )
    if par.sharded:  # rank 0 goes on with the whole model, as the checkpoint gathered it
        if not par.is_main:
            return {}
        plain = _gathered(base, cfg, device, result.checkpoint)
    elif not par.is_main:
        return {}
    if result.step == cfg.train.max_steps and last_eval:  # fit scored these very weights
        after, preds = last_eval["out"], last_eval["preds"]
    else:
        after, preds = evaluate(plain), last_eval["preds"]
    model = plain

    # Save: adapters (PEFT format) and the merged model.
    adapter_dir = model_dir = None
    if cfg.method in ("lora", "dora", "qlora"):
        adapter_dir = save_adapter(model, run_dir / "adapter", base=str(base_ckpt))
    if bf16_base:
        # Its frozen Linears are bf16, rounded from the base: merge the saved adapter into the
        # base as on disk instead, as `lmforge merge` does (fp32), so the merged model is the
        # one an fp32-stored base would have given. The trained copy goes first (memory).
        del model, plain, optimizer
        model, tokenizer, fmt = merged_model(base_ckpt, adapter_dir)
        model_dir = write_model_folder(model, tokenizer, fmt, run_dir / "model")
    elif cfg.method != "qlora":
        if cfg.method in ("lora", "dora"):
            from lmforge.models.lora import merge_lora

            merge_lora(model)
        model_dir = write_model_folder(model, tokenizer, fmt, run_dir / "model")

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "base": str(base_ckpt),
        "method": cfg.method,
        "chat_template": fmt.source,
        "train_examples": stats.examples,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "skipped_records": len(problems),
        "eval_prompts": len(eval_pairs),
        "trainable_params": report["trainable"],
        "total_params": report["total"],
        "steps": result.step,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "before": before,
        "after": after,
        "exact_match_gain": after["exact_match"] - before["exact_match"],
        "adapter": str(adapter_dir) if adapter_dir else None,
        "model": str(model_dir) if model_dir else None,
        "samples": [
            {"prompt": qa.history[-1]["content"], "answer": qa.answer, "prediction": p}
            for qa, p in list(zip(eval_pairs, preds, strict=True))[: cfg.n_samples]
        ],
    }
    if retained is not None:
        summary |= forgetting(before, after)
    summary["wall_seconds"] = time.perf_counter() - t_start
    return runs.finish(run, summary)


def _gathered(base: str, cfg: FinetuneConfig, device: torch.device, ckpt: Path | None):
    """The plain (unsharded) model with the weights fit's last checkpoint gathered."""
    if ckpt is None:
        raise ConfigError("train.max_steps: the sharded run saved no checkpoint to gather")
    model = load(base, device, expect="decoder").model.to(dtype=weight_dtype(cfg.train.precision))
    model = prepare_model(model, cfg.method, cfg.lora)
    load_weights(model, ckpt)
    return model


def _pad(tokenizer) -> int:
    try:
        return pad_id(tokenizer)
    except Exception:  # a tokenizer without a pad token: padded targets are -100 anyway
        return 0


def _retain_source(
    retained: Retained,
    fmt: ChatFormat,
    context: int,
    cfg: FinetuneConfig,
    tokenizer,
    batch_size: int = 1,
):
    """Batches of retained data: SFT rows (packed) or text windows."""
    if retained.kind == "text":
        ctx = min(context, len(retained.tokens) - 1)
        return TokenBatches(retained.tokens, ctx, batch_size, seed=cfg.train.seed + 1)
    ex, _ = encode_examples(retained.convs, fmt, context, False, "right")
    return SFTBatches(
        ex, context, batch_size, cfg.train.seed + 1, pad_id=_pad(tokenizer), pack=True
    )


def print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"finetune summary ({s['method']})", show_header=True)
    table.add_column("metric")
    table.add_column("before")
    table.add_column("after")
    for k, v in s["before"].items():
        table.add_row(k, f"{v:.4f}", f"{s['after'].get(k, math.nan):.4f}")
    console.print(table)
    console.print(
        f"exact match {s['before']['exact_match']:.1%} → {s['after']['exact_match']:.1%} "
        f"on {s['eval_prompts']} held-out prompts; trainable {s['trainable_params']:,} of "
        f"{s['total_params']:,}; {s['steps']} steps, {s['tokens_per_s']:,.0f} tok/s, "
        f"wall {s['wall_seconds']:.0f} s"
    )
    for key in ("forgetting_bpb", "forgetting_em"):
        if key in s:
            console.print(f"forgetting ({key.split('_')[1]}, positive = forgotten): {s[key]:+.4f}")
    for sample in s["samples"]:
        console.print(
            f"  {sample['prompt']!r} → {sample['prediction']!r} (expected {sample['answer']!r})",
            markup=False,
            highlight=False,
        )
    console.print(f"adapter: {s['adapter']}   model: {s['model']}")
