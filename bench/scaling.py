"""Data-parallel scaling on this machine: tokens/s of 1 process vs 2 processes (DDP, FSDP).

Follows /work/shared/BENCHMARKING.md: the settings alternate round by round (A B C D A B C D …)
on the same random tokens, the demo model (configs/pretrain/cpu_demo.yaml: Llama-style,
4 layers, 4 heads, 256 wide, context 128, vocab 1,024, bf16 autocast, AdamW) and the same
global batch (strong scaling: 32 sequences per step, split over the ranks); each round times
≥ 20 steps after warm-up and keeps the median; /proc/stat tells whether other work shared the CPU.
Every step is lmforge's own (``train.loop.accumulate_gradients`` through the distributed seam,
gloo on CPU). Each process of an n-process setting gets 2/n threads, so every setting uses the
same two cores.

Scaling efficiency = tokens/s(2 processes) / (2 x tokens/s(1 process, 1 thread)): how much of a
second worker's throughput survives the gradient communication. The ratio to 1 process with 2
threads answers the practical question for this machine: does splitting the cores into ranks
beat letting one process use both?

    python bench/scaling.py            # full run (≈ 5 min on 2 cores)
    python bench/scaling.py --quick    # smoke test: checks that it runs, not a figure
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.cli import resolve_config
from lmforge.models.decoder import Decoder
from lmforge.train import distributed
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import accumulate_gradients
from lmforge.train.optim import OptimConfig, build_optimizer

CORES = 2
GLOBAL_BATCH, CONTEXT, VOCAB = 32, 128, 1024
PRECISION = "bf16-mixed"
# (name, processes, strategy, threads per process)
SETTINGS = [
    ("1 process, 2 threads", 1, "none", 2),
    ("1 process, 1 thread", 1, "none", 1),
    ("2 processes DDP, 1 thread each", 2, "ddp", 1),
    ("2 processes FSDP, 1 thread each", 2, "fsdp", 1),
]


def demo_model() -> Decoder:
    """The CPU demo's model (configs/pretrain/cpu_demo.yaml), with the tokenizer's vocabulary."""
    cfg = resolve_config("pretrain", None, {}).model.model_copy(
        update={"vocab_size": VOCAB, "dropout": 0.0}
    )
    assert cfg.context_length == CONTEXT
    torch.manual_seed(0)
    return Decoder(cfg)


def worker(rank: int, world: int, port: int, strategy: str, threads: int, args: dict) -> None:
    """One rank: warm up, time ``steps`` optimizer steps, rank 0 writes the step times."""
    distributed.set_local_rank_env(rank, world, port)
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    par = distributed.setup(DistConfig(strategy=strategy), cpu) if world > 1 else distributed.SINGLE
    try:
        model = demo_model()
        model = distributed.parallelize(model, par, DistConfig(), PRECISION)
        optimizer = build_optimizer(distributed.unwrap(model), OptimConfig(lr=1e-3))
        clip = distributed.clip_grad_norm_ if par.sharded else torch.nn.utils.clip_grad_norm_
        params = [p for p in model.parameters() if p.requires_grad]
        per_rank = GLOBAL_BATCH // world
        g = torch.Generator().manual_seed(rank)
        data = torch.randint(0, VOCAB, (8, per_rank, CONTEXT + 1), generator=g)
        times = []
        for i in range(args["warmup"] + args["steps"]):
            batch = data[i % len(data)]
            par.barrier()  # every rank starts the step together: times are per global step
            t0 = time.perf_counter()
            accumulate_gradients(model, [(batch[:, :-1], batch[:, 1:])], PRECISION, cpu, None, par)
            clip(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            par.barrier()
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(args["out"]).write_text(json.dumps(times))
    finally:
        distributed.teardown(par)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from the first line of /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    secs = [int(v) / hz for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    idle = secs[3] + secs[4]
    return sum(secs) - idle, sum(secs)


def run_setting(world: int, strategy: str, threads: int, warmup: int, steps: int) -> float:
    """Global tokens/s of one round: median step time over ``steps`` timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        args = {"warmup": warmup, "steps": steps, "out": out}
        mp.spawn(worker, args=(world, free_port(), strategy, threads, args), nprocs=world)
        times = json.loads(Path(out).read_text())
    return GLOBAL_BATCH * CONTEXT / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 round, 3 timed steps: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 2

    results: dict[str, list[float]] = {name: [] for name, *_ in SETTINGS}
    busy0, total0 = cpu_busy()
    t0 = time.time()
    for r in range(args.rounds):
        for name, world, strategy, threads in SETTINGS:
            tps = run_setting(world, strategy, threads, args.warmup, args.steps)
            results[name].append(tps)
            print(f"round {r + 1}: {name}: {tps:,.0f} tokens/s", file=sys.stderr, flush=True)
    busy1, total1 = cpu_busy()
    machine_busy = (busy1 - busy0) / max(1e-9, total1 - total0)

    med = {k: statistics.median(v) for k, v in results.items()}
    one_thread = med["1 process, 1 thread"]
    two_threads = med["1 process, 2 threads"]
    print(
        f"\n### Data-parallel scaling, demo model, {GLOBAL_BATCH}x{CONTEXT} tokens per step, "
        f"{PRECISION}, gloo\n"
    )
    print("| setting | tokens/s (median, min–max) | vs 1 process 2 threads | scaling efficiency |")
    print("|---|---|---|---|")
    for name, world, _, _ in SETTINGS:
        v = results[name]
        eff = f"{med[name] / (world * one_thread):.0%}" if world > 1 else "—"
        print(
            f"| {name} | {med[name]:,.0f} ({min(v):,.0f}–{max(v):,.0f}) | "
            f"{med[name] / two_threads:.2f}x | {eff} |"
        )
    print(
        f"\nrounds {args.rounds} x {args.steps} timed steps (after {args.warmup} warm-up), "
        f"alternating; machine CPU busy {machine_busy:.0%} of {os.cpu_count()} cores over "
        f"{time.time() - t0:.0f} s; torch {torch.__version__}; {datetime.now():%Y-%m-%d}; "
        f"scaling efficiency = tokens/s / (processes x 1-process-1-thread tokens/s)"
        + ("\n(--quick: a smoke test, not a figure)" if args.quick else "")
    )


if __name__ == "__main__":
    main()
