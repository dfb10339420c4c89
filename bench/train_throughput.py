"""Training throughput (tokens/s) and MFU of lmforge's decoder against Hugging Face GPT-2.

Follows /work/shared/BENCHMARKING.md: all settings run in this one process, round-robin
(A B C … A B C …) on the same random tokens, shapes and optimizer; each round times ≥ 20 steps
after warm-up and keeps the median; ratios are taken against peer fp32 round by round. The
peak for MFU is measured in the same run; /proc/stat tells whether other work shared the CPU.

    python bench/train_throughput.py            # full run (≈ 10 min on 2 cores)
    python bench/train_throughput.py --quick    # smoke test: checks that it runs, not a figure
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.loop import accumulate_gradients
from lmforge.train.optim import OptimConfig, build_optimizer, param_groups

THREADS = 2
LAYERS, HEADS, WIDTH, CONTEXT, VOCAB, BATCH = 6, 6, 384, 256, 8192, 8
LR, WEIGHT_DECAY, BETAS, CLIP = 3e-4, 0.1, (0.9, 0.95), 1.0
# (name, bf16 autocast, torch.compile) for lmforge; (name, bf16 autocast) for the peer
OURS = [("lmforge fp32", False, False), ("lmforge bf16 autocast", True, False),
        ("lmforge bf16 autocast + compile", True, True)]  # fmt: skip
PEERS = [("HF GPT2LMHeadModel fp32", False), ("HF GPT2LMHeadModel bf16 autocast", True)]
REWARM_STEPS = 2  # untimed steps at the start of each round: switching models evicts the caches


@dataclass
class Setting:
    """One row of the table: a model, its optimizer and how a step runs."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids → (B, T, V) logits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bf16: bool
    flops_per_token: float
    lmforge: bool = False  # lmforge rows train with lmforge's own step (train.loop)
    cold_s: float = 0.0  # first step: allocation, and compilation for compiled settings
    tokens_per_s: list[float] = field(default_factory=list)  # one median per round
    last_loss: float = float("nan")


def adamw(model: nn.Module, flags: dict) -> torch.optim.AdamW:
    """The peer's AdamW: lmforge's parameter groups (matrices decay; norms, biases and
    embeddings do not) and lmforge's eps and fused/foreach ``flags``, so only the model differs."""
    kw = dict(eps=flags["eps"], fused=flags.get("fused"), foreach=flags.get("foreach"))
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, **kw)


def decayed(opt: torch.optim.Optimizer) -> int:
    """Number of weights under weight decay: the two models should match."""
    return sum(p.numel() for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])


def build_lmforge() -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        arch="gpt2", vocab_size=VOCAB, context_length=CONTEXT, n_layer=LAYERS, n_head=HEADS,
        d_model=WIDTH, dropout=0.0,
    )  # fmt: skip
    return Decoder(cfg)


def build_peer() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
        eos_token_id=0,  # GPT-2's 50256 lies outside this vocabulary; unused when training
        attn_implementation="sdpa",  # the peer's fastest CPU attention, as lmforge uses SDPA
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def peer_flops_per_token(model: transformers.GPT2LMHeadModel) -> float:
    """6·N + 12·L·T·d with N = all weights but the embedding lookups, plus the (tied) head."""
    # parameters() yields the tied wte/lm_head matrix once: dropping the lookup (wte) and adding
    # the head back cancel, so only the position table leaves the count.
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6.0 * n + 12.0 * LAYERS * CONTEXT * WIDTH


def make_settings() -> list[Setting]:
    """The rows, peer fp32 (the reference) first; every model is built from seed 0."""
    rows: list[Setting] = []
    for name, bf16, compiled in OURS:
        model = build_lmforge().train()
        fwd = torch.compile(model) if compiled else model  # compiles at the first (cold) step
        opt = build_optimizer(model, OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS))
        rows.append(Setting(name, fwd, model, opt, bf16, model.flops_per_token(), lmforge=True))
    for name, bf16 in PEERS:  # the peer copies lmforge's optimizer flags (eps, fused, foreach)
        peer = build_peer().train()
        opt = adamw(peer, rows[0].optimizer.defaults)
        fwd = lambda x, m=peer: m(input_ids=x).logits
        rows.append(Setting(name, fwd, peer, opt, bf16, peer_flops_per_token(peer)))
    return [rows[len(OURS)], *rows[: len(OURS)], *rows[len(OURS) + 1 :]]


def train_step(s: Setting, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step: zero, forward, loss, backward, clip, update.

    lmforge rows run lmforge's own step function (what `lmforge pretrain` runs); the peer runs
    the plain PyTorch step an HF user writes. Both compute the mean fp32 cross-entropy.
    """
    s.optimizer.zero_grad(set_to_none=True)
    if s.lmforge:
        precision = "bf16-mixed" if s.bf16 else "fp32"
        loss, _ = accumulate_gradients(s.forward, [(x, y)], precision, torch.device("cpu"))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            logits = s.forward(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()  # outside autocast, as the autocast docs recommend
    torch.nn.utils.clip_grad_norm_(s.model.parameters(), CLIP)
    s.optimizer.step()
    return loss.detach()


def time_round(s: Setting, data: torch.Tensor, warmup: int, steps: int) -> float:
    """Run ``warmup`` untimed then ``steps`` timed steps; return median tokens/s."""
    times = []
    for i in range(warmup + steps):
        batch = data[i % len(data)]
        t0 = time.perf_counter()
        loss = train_step(s, batch[:, :-1], batch[:, 1:])
        if i >= warmup:  # CPU ops are synchronous, so the wall clock covers the whole step
            times.append(time.perf_counter() - t0)
    s.last_loss = float(loss)
    return data.shape[1] * (data.shape[2] - 1) / statistics.median(times)


def matmul_peaks(n: int, repeats: int, bf16_n: int | None = None) -> dict[str, float]:
    """Best FLOP/s of an n×n @ n×n matmul per dtype: the ceilings MFU is measured against.
    ``bf16_n``: a smaller bf16 size (--fp32 runs: emulated bf16 would take minutes)."""
    peaks = {}
    for key, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        n = bf16_n or n if key == "bf16" else n
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        times = []
        for _ in range(repeats + 1):  # the first call picks and caches the kernel: not counted
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        peaks[key] = 2 * n**3 / min(times[1:])
    return peaks


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from the first line of /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    secs = [int(v) / hz for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return sum(secs) - secs[3] - secs[4], sum(secs)  # busy = all but idle and iowait


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over all settings")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per setting before round 1")
    p.add_argument("--quick", action="store_true", help="smoke test: 2+3 steps, 1 round, batch 2")
    p.add_argument("--fp32", action="store_true",
                   help="fp32 rows only: CPUs without native bf16 emulate it ~50x slower")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args()
    args.batch = BATCH
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 1, 3, 2, 2
    return args


def warm_up(settings: list[Setting], data: torch.Tensor, steps: int) -> None:
    """First steps of every setting, untimed: allocation, kernel choice, compilation."""
    for s in settings:
        for i in range(max(steps, 1)):
            t0 = time.perf_counter()
            train_step(s, data[i % len(data), :, :-1], data[i % len(data), :, 1:])
            if i == 0:
                s.cold_s = time.perf_counter() - t0


def run_rounds(settings: list[Setting], data: torch.Tensor, rounds: int, steps: int) -> float:
    """Round-robin A B C … over the settings; return the CPU share other processes used."""
    # Only the timed rounds are watched: compilation (in worker processes whose CPU time we
    # cannot attribute) happened before, during the untimed warm-up.
    busy0, total0, proc0 = *cpu_busy(), time.process_time()
    for _ in range(rounds):
        for s in settings:
            s.tokens_per_s.append(time_round(s, data, REWARM_STEPS, steps))
    busy1, total1, proc1 = *cpu_busy(), time.process_time()
    return max(0.0, (busy1 - busy0) - (proc1 - proc0)) / (total1 - total0)


def report(args: argparse.Namespace, settings: list[Setting], meta: dict) -> list[dict]:
    """Print the set-up, the quiet check and the Markdown table; return the rows for JSON."""
    ours, peer, other = settings[1], settings[0], meta["other_cpu_fraction"]
    print(f"command: {meta['command']}\ndate: {meta['date']}; CPU: {meta['cpu']}")
    print(f"torch {meta['torch']}, transformers {meta['transformers']}; threads: {THREADS}")
    print(
        f"model: {LAYERS} layers, {HEADS} heads, {WIDTH} wide, context {CONTEXT}, vocab {VOCAB}, "
        f"batch {args.batch}, dropout 0, random tokens (seed 0)\nAdamW lr {LR}, wd {WEIGHT_DECAY}, "
        f"betas {BETAS}, clip {CLIP}, fused={ours.optimizer.defaults.get('fused')}; groups: "
        f"{meta['groups']}; decayed weights: lmforge {decayed(ours.optimizer):,}, "
        f"peer {decayed(peer.optimizer):,}"
    )
    print(
        f"FLOPs/token: lmforge {ours.flops_per_token / 1e6:.2f} M, peer "
        f"{peer.flops_per_token / 1e6:.2f} M; measured peak (square matmul, 2 threads, best of "
        f"runs): fp32 {meta['peak_fp32'] / 1e9:.0f}, bf16 {meta['peak_bf16'] / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{args.rounds} round(s) of {args.steps} timed steps (median per round) after "
        f"{args.warmup} warm-up steps; other processes used {other:.0%} of the CPU while timing"
    )
    if other > 0.10:
        print(f"WARNING: other processes used {other:.0%} of the CPU: wait for quiet and re-run")
    if args.rounds < 3 or args.steps < 20:
        print("NOTE: fewer than 3 rounds or 20 steps: a smoke test, not a figure to quote")

    print("\n| setting | tokens/s, median (min–max) | × HF fp32 | MFU | cold step |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for s in settings:
        ratios = [a / b for a, b in zip(s.tokens_per_s, peer.tokens_per_s, strict=True)]
        precision = "bf16" if s.bf16 else "fp32"  # MFU against the peak of the matmul dtype
        mfu = statistics.median(s.tokens_per_s) * s.flops_per_token / meta[f"peak_{precision}"]
        print(
            f"| {s.name} | {spread(s.tokens_per_s, ',.0f')} | {spread(ratios, '.2f')} | "
            f"{mfu:.0%} of {precision} | {s.cold_s:.1f} s |"
        )
        rows.append(dict(name=s.name, tokens_per_s=s.tokens_per_s, ratios_vs_peer_fp32=ratios,
                         mfu=mfu, cold_step_s=s.cold_s, last_loss=s.last_loss))  # fmt: skip
    print("\nper round, × HF fp32 (and the loss after the last step):")
    for r in rows:
        print(f"  {r['name']}: {', '.join(f'{x:.2f}' for x in r['ratios_vs_peer_fp32'])}"
              f" (loss {r['last_loss']:.3f})")  # fmt: skip
    return rows


def start_run(
    quick: bool, batch: int, vocab: int, context: int, fp32: bool = False
) -> tuple[tuple[int, int], dict, torch.Tensor]:
    """What every benchmark run begins with: the thread count, quiet transformers, the matmul
    peak before timing (its (size, repeats) to measure it again after) and the data."""
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    peak_args = (512, 3) if quick else (2048, 5)
    before = matmul_peaks(*peak_args, bf16_n=256 if fp32 else None)
    gen = torch.Generator().manual_seed(0)  # the same 4 batches, in the same order, for everyone
    return peak_args, before, torch.randint(0, vocab, (4, batch, context + 1), generator=gen)


def main() -> None:
    args = parse_args()
    peak_args, before, data = start_run(args.quick, args.batch, VOCAB, CONTEXT, args.fp32)
    settings = make_settings()
    if args.fp32:
        settings = [s for s in settings if not s.bf16]
    warm_up(settings, data, args.warmup)
    other = run_rounds(settings, data, args.rounds, args.steps)
    after = matmul_peaks(
        *peak_args, bf16_n=256 if args.fp32 else None
    )  # best of before and after: one noisy moment is not the peak

    meta = dict(
        command="python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        date=f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", cpu=cpu_model(),
        torch=torch.__version__, transformers=transformers.__version__, threads=THREADS,
        batch=args.batch, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
        **{f"peak_{k}": max(before[k], after[k]) for k in before},
        other_cpu_fraction=other, groups="lmforge.train.optim.param_groups",
    )  # fmt: skip
    rows = report(args, settings, meta)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, settings=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
