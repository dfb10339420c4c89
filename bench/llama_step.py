"""Training step speed and MFU of lmforge's Llama-style decoder (GQA) against ``LlamaForCausalLM``.

One random-init ``transformers.LlamaForCausalLM`` (5 layers, 320 wide, 5 query heads sharing 1
key/value head, SwiGLU 896, context 192, vocab 8192, untied head) is saved with
``save_pretrained`` and loaded into lmforge with the production converter
(``lmforge.interop.hf.load_hf``), so both sides train the same weights (checked: equal logits
before timing). A step is a full training step on both sides: zero_grad, forward, fp32
cross-entropy, backward, gradient clipping at 1.0 and a fused AdamW update with lmforge's
parameter groups. lmforge runs its own step (``accumulate_gradients``, what ``lmforge pretrain``
runs); the peer runs the plain PyTorch step an HF user writes.

Same method as ``train_throughput.py`` (/work/shared/BENCHMARKING.md): every setting in this
one process, round-robin on the same random tokens; each round times ``--steps`` steps after 2
untimed ones and keeps the median; ratios are taken round by round against the peer at the same
precision (fp32 vs HF fp32, bf16 autocast vs HF bf16 autocast) and against HF fp32.

    python bench/llama_step.py --fp32     # fp32 rows only (3 rounds x 20 steps, ~5 min on 2 cores)
    python bench/llama_step.py            # fp32 and bf16 autocast rows
    python bench/llama_step.py --compile  # adds lmforge fp32 + torch.compile (compile time shown)
    python bench/llama_step.py --quick    # smoke test: checks that it runs, not a figure

On CPUs without native bf16 (AVX2 only) bf16 matmuls are emulated ~40x slower than fp32: there
run the bf16 rows with few steps (``--steps 3 --rounds 2``) and read them as orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.interop.hf import load_hf
from lmforge.train.optim import OptimConfig, build_optimizer
from train_throughput import (  # shared bench helpers: same step, timing and MFU as there
    BETAS,
    CLIP,
    LR,
    THREADS,
    WEIGHT_DECAY,
    Setting,
    adamw,
    cpu_model,
    decayed,
    matmul_peaks,
    run_rounds,
    spread,
    start_run,
    warm_up,
)

LAYERS, HEADS, KV_HEADS, WIDTH, FFN, CONTEXT, VOCAB, BATCH = 5, 5, 1, 320, 896, 192, 8192, 8
# (name, bf16 autocast, torch.compile) for lmforge; (name, bf16 autocast) for the peer
OURS = [("lmforge fp32", False, False), ("lmforge bf16 autocast", True, False)]
COMPILED = ("lmforge fp32 + compile", False, True)
PEERS = [("HF LlamaForCausalLM fp32", False), ("HF LlamaForCausalLM bf16 autocast", True)]


def peer_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, attn_implementation="sdpa",  # the peer's fastest on CPU
    )  # fmt: skip


def make_settings(hf_dir: Path, compiled: bool) -> tuple[list[Setting], float]:
    """The rows, peer fp32 (the reference) first, and the max |logit difference| of the two
    models on the same tokens (the converter's parity, checked before anything is timed)."""
    rows: list[Setting] = []
    for name, bf16, compile_ in OURS + ([COMPILED] if compiled else []):
        model, _ = load_hf(hf_dir)
        model.train()
        fwd = torch.compile(model) if compile_ else model  # compiles at the first (cold) step
        opt = build_optimizer(model, OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS))
        rows.append(Setting(name, fwd, model, opt, bf16, model.flops_per_token(), lmforge=True))
    peers = []
    for name, bf16 in PEERS:  # the peer copies lmforge's optimizer flags (eps, fused, foreach)
        peer = transformers.LlamaForCausalLM.from_pretrained(hf_dir).train()
        opt = adamw(peer, rows[0].optimizer.defaults)
        fwd = lambda x, m=peer: m(input_ids=x).logits
        # the same formula and N as lmforge's: every weight but the embedding lookup
        flops = rows[0].flops_per_token
        peers.append(Setting(name, fwd, peer, opt, bf16, flops))
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (rows[0].model.eval()(x) - peers[0].model.eval()(input_ids=x).logits).abs().max()
    rows[0].model.train(), peers[0].model.train()
    return [peers[0], *rows, *peers[1:]], float(diff)


def report(args: argparse.Namespace, settings: list[Setting], meta: dict) -> list[dict]:
    """Print the set-up, the quiet check and the Markdown table; return the rows for JSON."""
    ours, peer, other = settings[1], settings[0], meta["other_cpu_fraction"]
    by_precision = {s.bf16: s for s in settings if not s.lmforge}  # the peer per precision
    print(f"command: {meta['command']}\ndate: {meta['date']}; CPU: {meta['cpu']}")
    print(f"torch {meta['torch']}, transformers {meta['transformers']}; threads: {THREADS}")
    print(
        f"model: Llama-style, {LAYERS} layers, {WIDTH} wide, {HEADS} heads : {KV_HEADS} kv head, "
        f"SwiGLU {FFN}, context {CONTEXT}, vocab {VOCAB}, untied head, batch {args.batch}, random "
        f"tokens (seed 0); weights: HF save_pretrained → lmforge load_hf, max |logit diff| "
        f"{meta['logit_diff']:.1e}\nAdamW lr {LR}, wd {WEIGHT_DECAY}, betas {BETAS}, clip {CLIP}, "
        f"fused={ours.optimizer.defaults.get('fused')}; decayed weights: lmforge "
        f"{decayed(ours.optimizer):,}, peer {decayed(peer.optimizer):,}"
    )
    print(
        f"FLOPs/token {ours.flops_per_token / 1e6:.2f} M (6·N + 12·L·T·d); measured peak (square "
        f"matmul, {THREADS} threads, best of runs): fp32 {meta['peak_fp32'] / 1e9:.0f}, bf16 "
        f"{meta['peak_bf16'] / 1e9:.1f} GFLOP/s"
    )
    print(
        f"{args.rounds} round(s) of {args.steps} timed steps (median per round) after "
        f"{args.warmup} warm-up steps; other processes used {other:.0%} of the CPU while timing"
    )
    if other > 0.10:
        print(f"WARNING: other processes used {other:.0%} of the CPU: wait for quiet and re-run")
    if args.rounds < 3 or args.steps < 20:
        print("NOTE: fewer than 3 rounds or 20 steps: orientation, not a figure to quote")

    print("\n| setting | tokens/s, median (min–max) | × HF same precision | × HF fp32 | MFU |"
          " cold step |\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    rows = []
    for s in settings:
        same = by_precision.get(s.bf16, peer)
        vs_same = [a / b for a, b in zip(s.tokens_per_s, same.tokens_per_s, strict=True)]
        vs_fp32 = [a / b for a, b in zip(s.tokens_per_s, peer.tokens_per_s, strict=True)]
        precision = "bf16" if s.bf16 else "fp32"  # MFU against the peak of the matmul dtype
        mfu = statistics.median(s.tokens_per_s) * s.flops_per_token / meta[f"peak_{precision}"]
        print(
            f"| {s.name} | {spread(s.tokens_per_s, ',.0f')} | {spread(vs_same, '.2f')} | "
            f"{spread(vs_fp32, '.2f')} | {mfu:.0%} of {precision} | {s.cold_s:.1f} s |"
        )
        rows.append(dict(name=s.name, tokens_per_s=s.tokens_per_s, ratios_vs_peer_same=vs_same,
                         ratios_vs_peer_fp32=vs_fp32, mfu=mfu, cold_step_s=s.cold_s,
                         last_loss=s.last_loss))  # fmt: skip
    print("\nper round, × HF at the same precision (and the loss after the last step):")
    for r in rows:
        print(f"  {r['name']}: {', '.join(f'{x:.2f}' for x in r['ratios_vs_peer_same'])}"
              f" (loss {r['last_loss']:.3f})")  # fmt: skip
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over all settings")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per setting before round 1")
    p.add_argument("--quick", action="store_true", help="smoke test: 2+3 steps, 1 round, batch 2")
    p.add_argument("--fp32", action="store_true", help="fp32 rows only (no native bf16: slow)")
    p.add_argument("--compile", action="store_true", help="add lmforge fp32 + torch.compile")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args()
    args.batch = BATCH
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 1, 3, 2, 2
    return args


def main() -> None:
    args = parse_args()
    peak_args, before, data = start_run(args.quick, args.batch, VOCAB, CONTEXT, args.fp32)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(peer_config()).save_pretrained(tmp)
        settings, logit_diff = make_settings(Path(tmp), args.compile)
    if args.fp32:
        settings = [s for s in settings if not s.bf16]
    warm_up(settings, data, args.warmup)
    other = run_rounds(settings, data, args.rounds, args.steps)
    after = matmul_peaks(*peak_args, bf16_n=256 if args.fp32 else None)
    meta = dict(
        command="python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        date=f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", cpu=cpu_model(),
        torch=torch.__version__, transformers=transformers.__version__, threads=THREADS,
        batch=args.batch, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
        **{f"peak_{k}": max(before[k], after[k]) for k in before},
        other_cpu_fraction=other, logit_diff=logit_diff,
    )  # fmt: skip
    rows = report(args, settings, meta)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, settings=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
