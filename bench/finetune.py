"""LoRA fine-tuning: lmforge's ``fit`` against ``transformers.Trainer`` + peft, tokens/s and memory.

One random-init Llama-style model (``LlamaForCausalLM`` from a ``LlamaConfig``) is saved with
``save_pretrained`` and loaded into lmforge with the production converter
(``lmforge.interop.hf.load_hf``), so both sides start from the same weights (checked: equal
logits). LoRA goes on every Linear of the blocks on both sides, same rank, alpha, optimizer
(fused AdamW), constant lr, gradient clipping 1.0, batches (the same pre-made token batches in
the same order) and precision (fp32, and bf16 autocast). Under bf16 autocast lmforge stores
the frozen Linears in bf16 as ``lmforge finetune`` does (``bf16_frozen_base``: the same matmuls
autocast computes from fp32 weights); the peer runs it twice: loaded in fp32 (the same numerics
as lmforge) and loaded in bf16 (``dtype=torch.bfloat16``, its own leanest eager set-up: bf16
embeddings, norms and residual stream too; peft keeps the adapters fp32). lmforge's bf16 rows
show their ratio to both. Each side runs its real training loop: ``lmforge.train.loop.fit`` and ``Trainer.train``. A step is timed from the start of one
step to the start of the next (lmforge: its ``next_batch`` call; Trainer: ``on_step_begin``),
so each side pays everything its loop does per step (forward, backward, clipping, optimizer,
zero_grad, logging every 10 steps, data).

Follows /work/shared/BENCHMARKING.md: all settings in one process, round-robin (A B A B …),
each round a short training run per setting whose first steps are dropped; medians per round,
ratios to the peer round by round. Peak memory is the peak of live tensor bytes during one
steady-state step (the 2nd) of each eager setting, measured with lmforge's
``LiveTensorTracker`` (torch's ``MemTracker``) entered and left at the same step boundaries.

    python bench/finetune.py              # 3 rounds × 10 timed steps (≈ 5 min on 2 cores)
    python bench/finetune.py --steps 20   # the ≥ 20 steps BENCHMARKING.md asks for (≈ 8 min)
    python bench/finetune.py --eager      # without the torch.compile rows
    python bench/finetune.py --fp32       # fp32 rows only (hosts without native bf16)
    python bench/finetune.py --quick      # smoke test (≈ 25 s): checks that it runs, not a figure

Writes bench/results/finetune-<date>.json and .txt (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.interop.hf import load_hf
from lmforge.models.linear_cross_entropy import head_in_loss
from lmforge.models.lora import LoraConfig, bf16_frozen_base, prepare_model, trainable_report
from lmforge.plan.tracker import LiveTensorTracker
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig, build_optimizer
from train_throughput import (  # shared bench helpers
    THREADS,
    cpu_busy,
    cpu_model,
    matmul_peaks,
    spread,
    start_run,
)

# Llama-style: 4 layers, 512 wide, 8 heads sharing 4 key/value heads (GQA, as Llama 3 /
# TinyLlama), SwiGLU 1376 (≈ 8/3·d), RMSNorm, RoPE, untied head; vocab 8192 as the other
# benches (with a 32k vocab the frozen head alone would be ≈ half of the step's FLOPs).
LAYERS, HEADS, KV_HEADS, WIDTH, FFN, VOCAB = 4, 8, 4, 512, 1376, 8192
CONTEXT, BATCH = 256, 8
RANK, ALPHA = 16, 32.0
LR, BETAS, EPS, CLIP = 3e-4, (0.9, 0.95), 1e-8, 1.0
LOG_EVERY = 10  # both loops log every 10 steps (lmforge's default log_every)
# Every Linear of the blocks. lmforge computes q, k and v with ONE fused Linear, so its adapter
# there is one rank-r LoRA on [q; k; v] (one A shared by q, k, v); peft on Llama puts three
# rank-r LoRAs on q_proj, k_proj, v_proj. lmforge thus has 2 fewer A matrices (r × d) per layer:
# 65,536 fewer trainable weights here, ≈ 0.5 % of the step's FLOPs (printed with the results).
LMFORGE_TARGETS = ["attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.proj"]
PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, bf16 autocast, torch.compile) per side. The Trainer's own torch_compile=True is not
# among the rows: the compiled rows show lmforge's best, not a compiled-vs-compiled match.
OURS = [("lmforge fit fp32", False, False), ("lmforge fit bf16-mixed", True, False),
        ("lmforge fit fp32 + compile (best fp32)", False, True),
        ("lmforge fit bf16-mixed + compile (best)", True, True)]  # fmt: skip
# (name, bf16 autocast, weights loaded in bf16). The last is the peer's own eager counterpart of
# lmforge's bf16 frozen base: from_pretrained(dtype=bfloat16); peft keeps the adapters in fp32
# (autocast_adapter_dtype) and Trainer(bf16=True) autocasts. Its embeddings, norms and residual
# stream are bf16 too (lmforge keeps them fp32), so it is not the same numerics.
PEERS = [("Trainer + peft fp32", False, False), ("Trainer + peft bf16=True", True, False),
         ("Trainer + peft bf16 weights + bf16=True", True, True)]  # fmt: skip
REWARM_STEPS = 2  # dropped at the start of each round: a new run, and switching evicts caches
MEMORY_STEP = 1  # the 0-based step whose live-tensor peak is measured (steady state: Adam exists)


def peer_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip


class StepClock:
    """Start-of-step timestamps and the live-tensor peak of step ``MEMORY_STEP``.

    Both loops call ``step_begins(i, model, optimizer)`` at the start of step i: lmforge's via
    its batch source, the Trainer's from ``on_step_begin``. The tracker is entered at the start
    of step ``MEMORY_STEP`` and left at the start of the next step, so it sees one whole step.
    """

    def __init__(self, track_memory: bool) -> None:
        self.stamps: list[float] = []
        self.track_memory = track_memory
        self.tracker: LiveTensorTracker | None = None
        self.peak: dict[str, int] = {}

    def step_begins(self, i: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.stamps.append(time.perf_counter())
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            self.peak = self.tracker.peak_breakdown("cpu")
            self.tracker = None
        if self.track_memory and i == MEMORY_STEP:
            gc.collect()  # as plan.tracker.track_peak: no cycle collected mid-step skews the peak
            self.tracker = LiveTensorTracker()
            self.tracker.track_external(model, optimizer)
            self.tracker.__enter__()
        self.stamps[-1] = time.perf_counter()  # the tracker's set-up is not part of the step

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


class PoolBatches:
    """The batch source ``fit`` reads (``context``, ``next_batch``, ``state_dict``) over the
    shared pool of batches, in order; ``fit`` calls ``next_batch`` at the start of each step."""

    def __init__(self, data: torch.Tensor, clock: StepClock, model: nn.Module, opt) -> None:
        self.data, self.clock, self.model, self.opt = data, clock, model, opt
        self.context = data.shape[2] - 1
        self.calls = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.clock.step_begins(self.calls, self.model, self.opt)
        window = self.data[self.calls % len(self.data)]  # (B, T + 1)
        self.calls += 1
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]


class PeerClock(transformers.TrainerCallback):
    """The Trainer's side of ``StepClock``: ``on_step_begin`` is where its step starts."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Trainer hands over its AcceleratedOptimizer; the states live in the torch optimizer.
        self.clock.step_begins(state.global_step, model, getattr(optimizer, "optimizer", optimizer))


@dataclass
class Setting:
    """One row of the table: a side, a precision, and how to run one short training run."""

    name: str
    bf16: bool
    compiled: bool
    run: Callable[[int, bool], StepClock]  # (steps, track memory) → the clock after the run
    model: nn.Module
    lmforge: bool
    bf16_weights: bool = False  # peer: loaded in bf16 (lmforge's bf16 rows: frozen base in bf16)
    cold_s: float = 0.0  # first step of the first run: allocation, and compilation
    tokens_per_s: list[float] = field(default_factory=list)  # one median per round
    peak: dict[str, int] = field(default_factory=dict)  # live bytes by category at the peak
    trainable: int = 0


def lmforge_setting(name: str, bf16: bool, compiled: bool, hf_dir: Path, data) -> Setting:
    """lmforge as ``lmforge finetune`` trains: the converted model, ``prepare_model`` (peft
    surgery on our modules), under bf16-mixed ``bf16_frozen_base`` (the frozen Linears stored
    in bf16), ``build_optimizer`` (fused AdamW) and ``fit``."""
    model, _ = load_hf(hf_dir)
    lora = LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=LMFORGE_TARGETS)
    model = prepare_model(model, "lora", lora)
    if bf16:
        bf16_frozen_base(model)
    sched = SchedConfig(name="constant", warmup_steps=0)

    def run(steps: int, track_memory: bool) -> StepClock:
        # A fresh optimizer per run, as the Trainer side gets (a new Trainer per round).
        opt = build_optimizer(model, OptimConfig(lr=LR, weight_decay=0.0, betas=BETAS, eps=EPS))
        clock = StepClock(track_memory)
        precision = "bf16-mixed" if bf16 else "fp32"
        cfg = TrainConfig(
            max_steps=steps + 1, batch_size=data.shape[1], precision=precision, grad_clip=CLIP,
            compile=compiled, log_every=LOG_EVERY, eval_every=10**9, save_every=10**9,
            device="cpu",
        )  # fmt: skip
        # steps + 1 step starts bound steps intervals; fit's final checkpoint comes after the
        # last start and is not timed (the Trainer side saves nothing).
        # as lmforge finetune: the head applied inside the loss (head_in_loss)
        with tempfile.TemporaryDirectory() as run_dir, head_in_loss(model) as head_loss:
            fit(
                model, opt, PoolBatches(data, clock, model, opt), cfg, peak_lr=LR, sched=sched,
                run_dir=Path(run_dir), device=torch.device("cpu"), checkpoint_files={},
                loss_fn=head_loss,
            )  # fmt: skip
        return clock

    report = trainable_report(model)["trainable"]
    return Setting(name, bf16, compiled, run, model, lmforge=True, bf16_weights=bf16,
                   trainable=report)  # fmt: skip


def peer_setting(
    name: str, bf16: bool, bf16_weights: bool, hf_dir: Path, data: torch.Tensor
) -> Setting:
    """The Hugging Face way: ``from_pretrained`` + ``get_peft_model`` + ``Trainer``."""
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, attn_implementation="sdpa", dtype=dtype
    )
    lora = peft.LoraConfig(
        task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
        target_modules=PEER_TARGETS, bias="none",
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    # labels = input_ids, the usual causal-LM set-up: the model shifts them itself, so it sees
    # the same (B, T) inputs as lmforge and scores T - 1 of them per row (lmforge T).
    rows = data[:, :, :-1].reshape(-1, data.shape[2] - 1)  # batch k = rows[k·B : (k+1)·B]
    dataset = [{"input_ids": r, "labels": r} for r in rows]

    def run(steps: int, track_memory: bool) -> StepClock:
        clock = StepClock(track_memory)
        with tempfile.TemporaryDirectory() as out_dir:
            args = transformers.TrainingArguments(
                output_dir=out_dir, per_device_train_batch_size=data.shape[1], max_steps=steps + 1,
                learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
                optim="adamw_torch_fused", max_grad_norm=CLIP, bf16=bf16, use_cpu=True,
                train_sampling_strategy="sequential", logging_strategy="steps",
                logging_steps=LOG_EVERY, save_strategy="no", eval_strategy="no", report_to=[],
                disable_tqdm=True, dataloader_num_workers=0, seed=0,
            )  # fmt: skip
            trainer = transformers.Trainer(
                model=model, args=args, train_dataset=dataset,
                data_collator=transformers.default_data_collator, callbacks=[PeerClock(clock)],
            )  # fmt: skip
            trainer.train()
        return clock

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Setting(name, bf16, False, run, model, lmforge=False, bf16_weights=bf16_weights,
                   trainable=trainable)  # fmt: skip


def check_same_model(hf_dir: Path, data: torch.Tensor) -> float:
    """Largest |logit difference| between the converted lmforge model and transformers' own."""
    ours, _ = load_hf(hf_dir)
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    x = data[0, :2, :-1]
    with torch.no_grad():
        return float((ours.eval()(x) - theirs.eval()(input_ids=x).logits).abs().max())


def flops_per_token(model: nn.Module) -> float:
    """LoRA training FLOPs per token: 4·N for frozen matmul weights (forward, and backward to
    the activations only), 6·N for trainable ones, plus attention's 12·L·T·d.

    N leaves out the input embedding (a lookup) and counts the output head (a matmul)."""
    total = 0.0
    for name, p in model.named_parameters():
        if "embed" in name or "tok_emb" in name or p.dim() < 2:
            continue
        total += (6.0 if p.requires_grad else 4.0) * p.numel()
    return total + 12.0 * LAYERS * CONTEXT * WIDTH


def quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with its progress and log lines kept off the terminal; errors still raise.

    Both loops still format and write them (lmforge's progress line to stderr, the Trainer's
    log dicts to stdout): that is part of what each costs per step."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over all settings")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setting before round 1")
    p.add_argument("--batch", type=int, default=BATCH, help="sequences per step")
    p.add_argument("--eager", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--fp32", action="store_true",
                   help="fp32 rows only: CPUs without native bf16 emulate it ~50x slower")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 2 steps, batch 2, no compiled rows")  # fmt: skip
    p.add_argument("--out", type=Path, help="stem of the .json/.txt results (default: "
                   "bench/results/finetune-<date>)")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 1, 2, 2, 2
    args.warmup = max(args.warmup, MEMORY_STEP + 2)  # the memory step and the step after it
    return args


def warm_up(settings: list[Setting], warmup: int) -> None:
    """A first short run of every setting, untimed: allocation, kernel choice, compilation,
    and the live-tensor peak of one steady-state step (eager settings only: the tracker's
    dispatch mode intercepts eager ops: not attempted on compiled code)."""
    for s in settings:
        clock = quietly(lambda s=s: s.run(warmup, not s.compiled))
        s.cold_s, s.peak = clock.step_times()[0], clock.peak


def run_rounds(settings: list[Setting], rounds: int, steps: int, tokens: int) -> float:
    """Round-robin A B C … over the settings; return the CPU share other processes used."""
    busy0, total0, proc0 = *cpu_busy(), time.process_time()
    for _ in range(rounds):
        for s in settings:
            times = quietly(lambda s=s: s.run(REWARM_STEPS + steps, False)).step_times()
            s.tokens_per_s.append(tokens / statistics.median(times[REWARM_STEPS:]))
    busy1, total1, proc1 = *cpu_busy(), time.process_time()
    return max(0.0, (busy1 - busy0) - (proc1 - proc0)) / (total1 - total0)


def report(args: argparse.Namespace, settings: list[Setting], meta: dict) -> tuple[str, list]:
    """The set-up, the quiet check, the Markdown table; returns (text, rows for JSON)."""
    out: list[str] = []
    peers = {s.bf16: s for s in settings if not s.lmforge and not s.bf16_weights}
    peer_bw = next((s for s in settings if not s.lmforge and s.bf16_weights), None)
    ours = next(s for s in settings if s.lmforge)
    other = meta["other_cpu_fraction"]
    out.append(f"command: {meta['command']}\ndate: {meta['date']}; CPU: {meta['cpu']}")
    out.append(
        f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
        f"accelerate {meta['accelerate']}; torch.set_num_threads({THREADS})"
    )
    out.append(
        f"model: LlamaForCausalLM, random init (seed 0), {LAYERS} layers, {HEADS} heads "
        f"({KV_HEADS} kv), {WIDTH} wide, SwiGLU {FFN}, vocab {VOCAB}, untied head; lmforge loads "
        f"its save_pretrained folder with lmforge.interop.hf.load_hf (max |logit diff| "
        f"{meta['logit_diff']:.1e})\ndata: the same {meta['pool']} random-token batches in the "
        f"same order, batch {args.batch} × context {CONTEXT}\nLoRA r {RANK}, alpha {ALPHA:g}, "
        f"dropout 0 on every block Linear (lmforge: fused qkv + proj + gate/up/down, "
        f"{ours.trainable:,} trainable; peft: q/k/v/o + gate/up/down, "
        f"{peers[False].trainable:,} trainable)\nAdamW fused, lr {LR} constant, betas {BETAS}, "
        f"eps {EPS}, weight decay 0, grad clip {CLIP}; both log every {LOG_EVERY} steps; "
        f"lmforge: fit(); peer: Trainer(use_cpu=True, optim=adamw_torch_fused, no eval/saving)"
        f"\nbf16: lmforge's bf16-mixed rows store the frozen Linears (head included) in bf16 "
        f"(bf16_frozen_base, as lmforge finetune: the matmuls autocast would compute anyway; "
        f"adapters, embeddings, norms, residual stream fp32); the peer's 'bf16 weights' row "
        f"loads the whole model in bf16 (adapters fp32), the others load it in fp32"
    )
    out.append(
        f"LoRA FLOPs/token (4·N frozen + 6·N trainable + 12·L·T·d): lmforge "
        f"{meta['flops_lmforge'] / 1e6:.2f} M, peer {meta['flops_peer'] / 1e6:.2f} M; measured "
        f"peak: fp32 {meta['peak_fp32'] / 1e9:.0f}, bf16 {meta['peak_bf16'] / 1e9:.0f} GFLOP/s"
    )
    out.append(
        f"{args.rounds} round(s) × {args.steps} timed steps (median per round; a step = start "
        f"to start of the next, {REWARM_STEPS} dropped per round) after {args.warmup} warm-up "
        f"steps; other processes used {other:.0%} of the CPU while timing"
    )
    if other > 0.10:
        out.append(f"WARNING: other processes used {other:.0%} of the CPU: wait for quiet, re-run")
    if args.rounds < 3 or args.steps < 20:
        out.append("NOTE: fewer than 3 rounds or 20 steps per round: preliminary, not a figure")

    out.append(
        "\n| setting | tokens/s, median (min–max) | × peer, same precision | × peer bf16 weights "
        "| MFU | peak live MiB | memory × peer | memory × peer bf16 weights | cold step |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    mib = 2**20
    for s in settings:
        peer = peers[s.bf16]
        ratios = [a / b for a, b in zip(s.tokens_per_s, peer.tokens_per_s, strict=True)]
        # against the peer with bf16 weights: bf16 rows only (it runs under bf16 autocast)
        ratios_bw = []
        if s.bf16 and peer_bw is not None:
            ratios_bw = [a / b for a, b in zip(s.tokens_per_s, peer_bw.tokens_per_s, strict=True)]
        precision = "bf16" if s.bf16 else "fp32"  # MFU against the peak of the matmul dtype
        flops = meta["flops_lmforge" if s.lmforge else "flops_peer"]
        mfu = statistics.median(s.tokens_per_s) * flops / meta[f"peak_{precision}"]
        total = s.peak.get("Total", 0)
        mem = f"{total / mib:,.0f}" if total else "—"
        mem_ratio = f"{total / peer.peak['Total']:.2f}" if total and peer.peak else "—"
        mem_bw = total and s.bf16 and peer_bw is not None and peer_bw.peak
        mem_ratio_bw = f"{total / peer_bw.peak['Total']:.2f}" if mem_bw else "—"
        out.append(
            f"| {s.name} | {spread(s.tokens_per_s, ',.0f')} | {spread(ratios, '.2f')} | "
            f"{spread(ratios_bw, '.2f') if ratios_bw else '—'} | {mfu:.0%} of {precision} | "
            f"{mem} | {mem_ratio} | {mem_ratio_bw} | {s.cold_s:.1f} s |"
        )
        rows.append(dict(name=s.name, lmforge=s.lmforge, bf16=s.bf16, compile=s.compiled,
                         bf16_weights=s.bf16_weights, tokens_per_s=s.tokens_per_s,
                         ratios_vs_peer=ratios, ratios_vs_peer_bf16_weights=ratios_bw, mfu=mfu,
                         peak_live_bytes=s.peak, cold_step_s=s.cold_s,
                         trainable=s.trainable))  # fmt: skip
    out.append("\nper round, × peer at the same precision (bf16 rows: and × peer bf16 weights):")
    for r in rows:
        line = f"  {r['name']}: {', '.join(f'{x:.2f}' for x in r['ratios_vs_peer'])}"
        if r["ratios_vs_peer_bf16_weights"]:
            line += f"; {', '.join(f'{x:.2f}' for x in r['ratios_vs_peer_bf16_weights'])}"
        out.append(line)
    out.append("\npeak live tensors by category (MiB):")
    for r in rows:
        if r["peak_live_bytes"]:
            parts = {k: v / mib for k, v in r["peak_live_bytes"].items() if v}
            out.append(f"  {r['name']}: " + ", ".join(f"{k} {v:,.1f}" for k, v in parts.items()))
    return "\n".join(out), rows


def main() -> None:
    args = parse_args()
    peak_args, before, data = start_run(args.quick, args.batch, VOCAB, CONTEXT, args.fp32)

    # The folder stays until the end: loaded weights may still map its file.
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "llama"
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(peer_config()).save_pretrained(hf_dir)
        logit_diff = check_same_model(hf_dir, data)
        # A B A B: peer and lmforge alternate at each precision, the compiled row last.
        # Then the peer with bf16 weights, next to lmforge's bf16-mixed row.
        settings = [peer_setting(*PEERS[0], hf_dir, data)]
        settings += [lmforge_setting(*OURS[0], hf_dir, data), peer_setting(*PEERS[1], hf_dir, data)]
        settings += [lmforge_setting(*OURS[1], hf_dir, data), peer_setting(*PEERS[2], hf_dir, data)]
        # compiled rows last; --quick leaves them out (compiling takes ≈ 25 s each)
        settings += [
            lmforge_setting(*o, hf_dir, data)
            for o in OURS[2:]
            if not (o[2] and (args.quick or args.eager))
        ]
        if args.fp32:
            settings = [s for s in settings if not s.bf16]
        warm_up(settings, args.warmup)
        other = run_rounds(settings, args.rounds, args.steps, args.batch * CONTEXT)
    after = matmul_peaks(*peak_args, bf16_n=256 if args.fp32 else None)

    meta = dict(
        command="python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        date=f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", cpu=cpu_model(),
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
        accelerate=__import__("accelerate").__version__, threads=THREADS, batch=args.batch,
        context=CONTEXT, rounds=args.rounds, steps=args.steps, warmup=args.warmup, pool=len(data),
        logit_diff=logit_diff, other_cpu_fraction=other,
        flops_lmforge=flops_per_token(settings[1].model),
        flops_peer=flops_per_token(settings[0].model),
        **{f"peak_{k}": max(before[k], after[k]) for k in before},
    )  # fmt: skip
    text, rows = report(args, settings, meta)
    print(text)
    stem = args.out or Path(__file__).parent / "results" / f"finetune-{datetime.now():%Y-%m-%d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.txt").write_text(text + "\n")
    Path(f"{stem}.json").write_text(json.dumps(dict(meta=meta, settings=rows), indent=2) + "\n")
    print(f"\nwrote {stem}.txt and {stem}.json")


if __name__ == "__main__":
    main()
