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

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import save_model

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.store import find_checkpoint, load_for_inference, load_weights, new_run_dir
from lmforge.config import Section, save_config, to_yaml
from lmforge.data.instructions import FAMILIES, as_plain_text, make_suite
from lmforge.data.loader import TokenBatches
from lmforge.data.sft import (
    ChatFormat,
    MixedBatches,
    SFTBatches,
    SFTDataConfig,
    encode_examples,
    read_conversations,
)
from lmforge.data.tokenizer import EOS, pad_id
from lmforge.eval.generation import exact_match_eval, qa_pairs
from lmforge.eval.metrics import final_number_match, stripped_match
from lmforge.eval.retained import Retained, forgetting
from lmforge.models.decoder import DecoderConfig
from lmforge.models.lora import (
    LoraConfig,
    Method,
    bf16_frozen_base,
    prepare_model,
    save_adapter,
    trainable_report,
)
from lmforge.plan.estimate import Workload
from lmforge.train.device import setup_device
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.metrics_log import write_plots
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


class DemoBaseConfig(Section):
    """The small base ``finetune`` pretrains first when no ``base`` is given."""

    steps: int = Field(1500, gt=0, description="pretraining steps on the suite's plain text")
    n_per_family: int = Field(3000, gt=0, description="plain-text examples per family")
    families: list[str] | None = Field(
        None, description="families in the pretraining text; null = suite.families"
    )


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
    train: TrainConfig = TrainConfig(
        max_steps=1000, batch_size=16, eval_every=500, save_every=500, log_every=10, num_threads=2
    )
    optim: OptimConfig = OptimConfig(lr=3e-3, weight_decay=0.0)
    sched: SchedConfig = SchedConfig(warmup_steps=10)
    out_dir: str | None = Field(None, description="run folder; null = runs/finetune-<date>-<time>")
    resume: str | None = Field(None, description="a checkpoint of this run to continue from")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        check_warmup(self.sched, self.train.max_steps)
        if self.retain.path is None and (
            self.retain.replay_rows or self.retain.ewc_lambda or self.retain.l2sp_lambda
        ):
            raise ValueError("retain.replay_rows/ewc_lambda/l2sp_lambda need retain.path")
        return self


# The model ``demo_base`` pretrains (its tokenizer: 512 tokens).
DEMO_BASE_MODEL = dict(
    arch="llama", context_length=96, n_layer=4, n_head=4, d_model=128, tie_embeddings=True
)


def train_context(cfg: FinetuneConfig, model_cfg: DecoderConfig) -> int:
    """Tokens per training row: ``context_length``, else min(the model's context, 512)."""
    return cfg.context_length or min(model_cfg.context_length, 512)


def memory_workload(cfg: FinetuneConfig, model_cfg: DecoderConfig, device_type: str) -> Workload:
    """What this fine-tune runs, for the memory estimator (``lmforge estimate --config``) and
    planner (``train.memory_budget``): micro-batch, accumulation, row length, precision,
    checkpointing, optimizer, method and adapters (lora.targets, lmforge's module names, mapped
    by ``plan.estimate.lora_terms``)."""
    from lmforge.plan.autofit import train_workload
    from lmforge.plan.estimate import lora_terms

    lora = cfg.lora
    return train_workload(
        cfg.train, cfg.optim, train_context(cfg, model_cfg), device_type, method=cfg.method,
        lora_rank=lora.rank, lora_targets=lora_terms(lora.targets), lora_dropout=lora.dropout,
        qlora_double_quant=lora.double_quant, train_blocks=lora.train_blocks,
        train_norms=lora.train_norms, train_embeddings=lora.train_embeddings,
    )  # fmt: skip


def demo_base(run_dir: Path, cfg: FinetuneConfig) -> Path:
    """Pretrain a tiny Llama-style model on the suite's tasks written as plain text lines
    (``reverse: c a t = t a c``), mixed with chat-formatted examples of the *other* families.
    It knows the tasks and it knows the chat format, but has never seen these tasks asked in a
    chat: what an instruction tune teaches a real base model (without chat examples a 1M model
    spends the whole fine-tune learning the template's bytes; measured: 3 % exact match)."""
    from lmforge.recipes.pretrain import PretrainConfig, pretrain

    base_dir = run_dir / "base"
    if (base_dir / "checkpoints" / "latest").exists():
        return base_dir
    text_path = run_dir / "base_text.txt"
    families = cfg.demo_base.families or cfg.suite.families
    examples = make_suite(families, cfg.demo_base.n_per_family, seed=cfg.suite.seed + 1)
    units = as_plain_text(examples).splitlines(keepends=True)
    others = [f for f in FAMILIES if f not in set(families) | set(cfg.suite.families)]
    for ex in make_suite(others, cfg.demo_base.n_per_family // 2, seed=cfg.suite.seed + 2):
        # ChatML as ChatFormat.chatml renders it for lmforge's tokenizer (EOS ends a turn)
        units.append(
            f"<|im_start|>user\n{ex['prompt']}{EOS}\n<|im_start|>assistant\n{ex['answer']}{EOS}\n"
        )
    random.Random(cfg.suite.seed + 3).shuffle(units)  # the val split is the text's last 10 %
    atomic_write_text(text_path, "".join(units))
    log.info("no base given: pretraining a small demo base on %s first", text_path)
    pcfg = PretrainConfig.model_validate(
        dict(
            data=dict(
                path=str(text_path), vocab_size=512, near_dedup=False, dedup=False, num_workers=1
            ),
            model=DEMO_BASE_MODEL,
            train=dict(
                max_steps=cfg.demo_base.steps,
                batch_size=16,
                eval_every=cfg.demo_base.steps,
                save_every=cfg.demo_base.steps,
                precision="bf16-mixed",
                num_threads=cfg.train.num_threads,
                log_every=50,
            ),
            optim=dict(lr=3e-3, weight_decay=0.1),
            sched=dict(warmup_steps=min(20, cfg.demo_base.steps // 10)),
            sample=dict(prompt="reverse: a b c =", max_new_tokens=8, temperature=0.0),
            out_dir=str(base_dir),
        )
    )
    pretrain(pcfg)
    return base_dir


def _suite_records(cfg: FinetuneConfig) -> tuple[list, list[str]]:
    ex = make_suite(cfg.suite.families, cfg.suite.n_per_family, seed=cfg.suite.seed)
    convs = [
        [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]
        for e in ex
    ]
    return convs, [e["family"] for e in ex]


def _write_model_folder(model, tokenizer, fmt: ChatFormat, out: Path) -> Path:
    """A self-describing inference checkpoint: weights, model config, tokenizer, chat template."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    atomic_write_text(out / "config.yaml", to_yaml(_ModelOnly(model=model.cfg)))
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    atomic_write_text(out / "chat_template.jinja", fmt.template)
    eos = tokenizer.id_to_token(fmt.end_of_turn)
    atomic_write_text(
        out / "tokenizer_config.json", json.dumps({"eos_token": eos}, indent=2) + "\n"
    )
    return out


class _ModelOnly(Section):
    model: Any


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the whole fine-tune; returns the summary also written to ``summary.json``."""
    t_start = time.perf_counter()
    device = setup_device(cfg.train.device, cfg.train.num_threads)
    run_dir = new_run_dir(cfg.out_dir, "finetune", resume=bool(cfg.resume))
    save_config(cfg, run_dir / "config.yaml")

    # Base model, tokenizer and chat template.
    base = cfg.base or str(demo_base(run_dir, cfg))
    model, tokenizer, base_ckpt = load_for_inference(base, device)
    fmt = ChatFormat.for_checkpoint(base_ckpt, tokenizer)
    log.info("base %s; chat template: %s", base_ckpt, fmt.source)
    context = train_context(cfg, model.cfg)
    if cfg.train.memory_budget:  # micro-batch, accumulation, checkpointing (+ allowed changes)
        from lmforge.plan.autofit import apply_memory_budget

        w = memory_workload(cfg, model.cfg, device.type)
        train, plan = apply_memory_budget(cfg.train, w, model.cfg, device.type, run_dir, True)
        cfg = cfg.model_copy(update={"train": train, "method": plan["method"]})
        save_config(cfg, run_dir / "config.yaml")  # the values that run
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
    match = final_number_match if cfg.score == "final_number" else stripped_match
    examples, stats = encode_examples(
        train_convs, fmt, context, cfg.data.train_on_prompt, cfg.data.truncation
    )
    batches: Any = SFTBatches(
        examples,
        context,
        cfg.train.batch_size,
        cfg.train.seed,
        pad_id=_pad(tokenizer),
        pack=cfg.data.pack,
    )

    retained = (
        Retained.load(cfg.retain.path, fmt, cfg.retain.n_eval, cfg.retain.max_chars)
        if cfg.retain.path
        else None
    )

    last_eval: dict[str, Any] = {}

    # Surgery first: "before" scores the model as training starts (LoRA's B = 0 leaves the
    # base's function unchanged; QLoRA's base is then the NF4 one it trains on).
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

    before = evaluate(model)
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
        if cfg.retain.replay_rows:
            batches = MixedBatches(batches, retain_batches, cfg.retain.replay_rows)
    optimizer = build_optimizer(model, cfg.optim)
    resume_ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
    if resume_ckpt is not None:
        load_weights(model, resume_ckpt)

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
        evaluate=evaluate,
    )
    write_plots(run_dir)
    if result.step == cfg.train.max_steps and last_eval:  # fit scored these very weights
        after, preds = last_eval["out"], last_eval["preds"]
    else:
        after, preds = evaluate(model), last_eval["preds"]

    # Save: adapters (PEFT format) and the merged model.
    adapter_dir = model_dir = None
    if cfg.method in ("lora", "dora", "qlora"):
        adapter_dir = save_adapter(model, run_dir / "adapter", base=str(base_ckpt))
    if bf16_base:
        # Its frozen Linears are bf16, rounded from the base: merge the saved adapter into the
        # base as on disk instead, as `lmforge merge` does (fp32), so the merged model is the
        # one an fp32-stored base would have given. The trained copy goes first (memory).
        del model, optimizer
        where = dict(base=str(base_ckpt), adapter=str(adapter_dir), out_dir=str(run_dir / "model"))
        model_dir = merge(MergeConfig(**where))
    elif cfg.method != "qlora":
        if cfg.method in ("lora", "dora"):
            from lmforge.models.lora import merge_lora

            merge_lora(model)
        model_dir = _write_model_folder(model, tokenizer, fmt, run_dir / "model")

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
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


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


class MergeConfig(Section):
    base: str = Field(description="the base checkpoint the adapter was trained on")
    adapter: str = Field(
        description="adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    out_dir: str = Field(description="folder to write the merged checkpoint to")


def merge(cfg: MergeConfig) -> Path:
    """Load the full-precision base, put the adapter on, fold it in, write a checkpoint folder."""
    from lmforge.models.lora import load_adapter, merge_lora

    model, tokenizer, ckpt = load_for_inference(cfg.base, torch.device("cpu"))
    fmt = ChatFormat.for_checkpoint(ckpt, tokenizer)
    merge_lora(load_adapter(model, cfg.adapter))
    return _write_model_folder(model, tokenizer, fmt, Path(cfg.out_dir))
