"""Training speed beside a busy neighbour: the CPU demo model alone and beside `yes > /dev/null`.

On a laptop something else always runs. OpenMP's default wait policy spins a waiting thread
for a while before it sleeps; when another process holds one of the two cores, torch's second
thread spins on a core it does not have and every parallel region waits for the descheduled
one. This bench measures tokens/s of the demo model's training step (lmforge's own
``accumulate_gradients`` + AdamW, the demo's shapes) under several OpenMP settings, each alone
and beside one busy process, in one run (method: /work/shared/BENCHMARKING.md): every setting
runs in a fresh process (OpenMP reads its environment once), the settings alternate round by
round, and each figure is the median over rounds.

    python bench/busy_neighbour.py            # full run (≈ 8 min on 2 cores)
    python bench/busy_neighbour.py --quick    # smoke test: checks that it runs, not a figure
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (row name, environment added to the child's). The reference for the percentages is the
# second row: a fixed 2 threads with torch's default wait policy, lmforge's speed before.
SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("lmforge: threads follow the load (default)", {}),
    ("2 threads fixed (torch default)", {"LMFORGE_BENCH_ADAPT": "0"}),
    (
        "2 threads, OMP_WAIT_POLICY=PASSIVE",
        {"LMFORGE_BENCH_ADAPT": "0", "OMP_WAIT_POLICY": "PASSIVE"},
    ),
    ("1 thread fixed", {"LMFORGE_BENCH_ADAPT": "0", "LMFORGE_BENCH_THREADS": "1"}),
]
REFERENCE = 1
MIN_WARMUP_S = 5.0  # the governor looks every 3 s: time it in its steady state, as a long run


def child(steps: int, warmup: int, precision: str) -> None:
    """Train the demo model for ``warmup`` + ``steps`` steps and print tokens/s as JSON."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.train.optim import OptimConfig, build_optimizer
    from lmforge.train.step import accumulate_gradients
    from lmforge.train.threads import thread_governor

    torch.set_num_threads(int(os.environ.get("LMFORGE_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    cfg = DecoderConfig(  # configs/pretrain/cpu_demo.yaml
        arch="llama", vocab_size=1024, context_length=128, n_layer=4, n_head=4, d_model=256,
        tie_embeddings=True,
    )  # fmt: skip
    model = Decoder(cfg).train()
    opt = build_optimizer(model, OptimConfig(lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95)))
    data = torch.randint(0, 1024, (64, 32, 129))
    device = torch.device("cpu")
    adapt = os.environ.get("LMFORGE_BENCH_ADAPT", "1") == "1"
    governor = thread_governor(adapt, device)  # as fit() does with train.adapt_threads
    times: list[float] = []
    started, i = time.perf_counter(), 0
    while len(times) < steps:
        batch = data[i % len(data)]
        t0 = time.perf_counter()
        if governor is not None:
            governor.update()
        opt.zero_grad(set_to_none=True)
        accumulate_gradients(model, [(batch[:, :-1], batch[:, 1:])], precision, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup and t0 - started >= MIN_WARMUP_S:
            times.append(time.perf_counter() - t0)
        i += 1
    tokens = 32 * 128
    print(json.dumps({"tokens_per_s": tokens * len(times) / sum(times)}))


def run_child(env_extra: dict[str, str], busy: bool, args: argparse.Namespace) -> float:
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--precision", args.precision]  # fmt: skip
    neighbour = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", help="fp32 or bf16-mixed")
    p.add_argument("--quick", action="store_true", help="1 round, 3 steps: a smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    if args.child:
        return child(args.steps, args.warmup, args.precision)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    settings = SETTINGS
    results: dict[str, dict[str, list[float]]] = {n: {"alone": [], "busy": []} for n, _ in settings}
    for r in range(args.rounds):
        for name, env in settings:
            for cond in ("alone", "busy"):
                tps = run_child(env, cond == "busy", args)
                results[name][cond].append(tps)
                print(f"round {r + 1} {name:40s} {cond:5s} {tps:8.0f} tokens/s", flush=True)
    ref = statistics.median(results[settings[REFERENCE][0]]["alone"])
    lines = [
        f"precision {args.precision}, {args.rounds} rounds × {args.steps} steps, "
        f"medians; % of the 2-threads-fixed figure alone ({ref:.0f} tokens/s)",
        "",
        "| setting | alone tokens/s | alone % | beside `yes` tokens/s | beside % |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, _ in settings:
        a = statistics.median(results[name]["alone"])
        b = statistics.median(results[name]["busy"])
        lines.append(
            f"| {name} | {a:.0f} | {100 * a / ref:.0f} % | {b:.0f} | {100 * b / ref:.0f} % |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M")
        (args.out / f"busy_neighbour-{stamp}.md").write_text(table + "\n")
        (args.out / f"busy_neighbour-{stamp}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
