"""The CPU speedrun of the main job: `lmforge pretrain` (no arguments) and the levers tried on it.

Issue 18 asks for val bits-per-byte ≤ 2.05 on TinyShakespeare's last 10 % with the whole
command in ≤ 300 s on a 2-core CPU. Each lever below is one set of overrides on the shipped
``cpu_demo`` preset; the quality column is the final val bits-per-byte (deterministic on one
host: thread count does not change the bits), the time column the whole command's wall time.

    python bench/speedrun.py                      # every lever, its bpb (2 at a time, 1 thread each)
    python bench/speedrun.py --only default --time   # `lmforge pretrain` timed alone, 2 threads
    python bench/speedrun.py --only "A:" "B:" --parallel 1
    python bench/speedrun.py --parts              # where a step's time goes (Muon, QK-norm)

Wall times are only meaningful with ``--time`` on a quiet machine (it runs one command at a
time with the preset's threads); the bpb column is valid under any load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD = [
    "--optim.name=adamw",
    "--sched.name=cosine",
    "--sched.min_lr_ratio=0.1",
    "--model.qk_norm=false",
]
A = [*OLD, "--train.max_steps=300"]
B = [*A, "--sched.name=wsd", "--sched.min_lr_ratio=0"]
C = [*B, "--optim.name=muon"]
D = [*C, "--model.qk_norm=true"]
# (row, overrides). "default" is the preset as shipped (= D with today's Muon, which
# orthogonalises q, k and v separately: base E); the others start from the preset before issue 18
# (450 AdamW steps, cosine to 10 %) and add one lever at a time. "patch:NAME" items are levers
# that are not lmforge options: bench/speedrun_patches.py patches them in (the rest are overrides).
LEVERS: list[tuple[str, list[str]]] = [
    ("default", []),
    ("before: 450 AdamW steps, cosine to 10 %", [*OLD, "--train.max_steps=450"]),
    ("A: the old preset cut to 300 steps", A),
    ("A + linear decay to 0", [*A, "--sched.name=linear", "--sched.min_lr_ratio=0"]),
    ("B: A + warm-up-stable-decay to 0", B),
    ("B + lr 4e-3", [*B, "--optim.lr=4e-3"]),
    ("B + QK-norm (AdamW)", [*B, "--model.qk_norm=true"]),
    ("C: B + Muon", C),
    ("C + lr 3e-3", [*C, "--optim.lr=3e-3"]),
    ("C + batch 16 x 600 steps", [*C, "--train.batch_size=16", "--train.max_steps=600"]),
    ("C + logit soft-cap 15", [*C, "patch:softcap"]),
    ("D: C + QK-norm (the preset)", D),
    ("D + lr 3e-3", [*D, "--optim.lr=3e-3"]),
    ("D + lr 5e-3", [*D, "--optim.lr=5e-3"]),
    ("D + lr 3e-3, batch 16 x 600", [*D, "--optim.lr=3e-3", "--train.batch_size=16",
                                     "--train.max_steps=600"]),
    ("D at 225 steps", [*D, "--train.max_steps=225"]),
    ("D + width 192", [*D, "--model.d_model=192"]),
    ("D + context 256, batch 16", [*D, "--model.context_length=256", "--train.batch_size=16"]),
    ("E + untied embeddings", ["--model.tie_embeddings=false"]),
    ("E + zero-init residual projections", ["patch:zero_proj"]),
    ("E + AdamW (embeddings, norms) at 3x lr", ["patch:adamw_lr_scale"]),
    ("E + AdamW (embeddings, norms) at 10x lr", ["patch:adamw_lr_scale=10"]),
    ("E + ReLU^2 MLP (1024 wide)", ["patch:relu2", "--model.mlp=gelu", "--model.d_ff=1024"]),
    ("E + value residual 0.5", ["patch:value_residual"]),
    ("E + Newton-Schulz 3 iterations", ["patch:ns_steps=3"]),
    ("E + dropout 0.1", ["--model.dropout=0.1"]),
    ("E + weight decay 0.5", ["--optim.weight_decay=0.5"]),
    ("E + weight decay 1.0", ["--optim.weight_decay=1.0"]),
    ("E + weight decay 2.0", ["--optim.weight_decay=2.0"]),
    ("E + value residual 0.5 + weight decay 1.0", ["patch:value_residual",
                                                   "--optim.weight_decay=1.0"]),
]  # fmt: skip


def step_parts(threads: int = 2, rounds: int = 6) -> None:
    """Where a step of the preset's model goes: forward + backward (QK-norm on and off), the
    Muon update, the AdamW update — medians in one process, after one warm-up round."""
    import statistics

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.train.optim import OptimConfig, build_optimizer

    torch.set_num_threads(threads)
    shape = dict(arch="llama", vocab_size=1024, context_length=128, n_layer=4, n_head=4,
                 d_model=256, tie_embeddings=True)  # fmt: skip
    models = {qk: Decoder(DecoderConfig(**shape, qk_norm=qk)).train() for qk in (True, False)}
    muon = build_optimizer(models[True], OptimConfig(name="muon", lr=1e-4))
    adamw = build_optimizer(models[True], OptimConfig(name="adamw", lr=1e-4))
    x = torch.randint(0, 1024, (32, 129))
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)

    def fwd_bwd(model) -> None:
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    for _ in range(rounds):
        timed("forward + backward, QK-norm off", lambda: fwd_bwd(models[False]))
        timed("forward + backward, QK-norm on", lambda: fwd_bwd(models[True]))
        timed("Muon update", muon.step)
        timed("AdamW update", adamw.step)
        muon.zero_grad()
        models[False].zero_grad()
    print(f"| part of a step (32 x 128 tokens, {threads} threads) | median ms |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t[1:]) * 1000:,.0f} |")


def run(name: str, overrides: list[str], threads: int | None, out: Path) -> dict:
    """One `lmforge pretrain` in a fresh process; its final val bpb and wall time."""
    patches = [o.removeprefix("patch:") for o in overrides if o.startswith("patch:")]
    flags = [o for o in overrides if not o.startswith("patch:")]
    runner = ["-m", "lmforge"]
    if patches:
        runner = [str(ROOT / "bench" / "speedrun_patches.py"), *patches, "--"]
    cmd = [sys.executable, *runner, "pretrain", f"--out_dir={out}", *flags]
    if threads is not None:  # bpb mode: fixed threads, the governor off
        cmd += [f"--train.num_threads={threads}", "--train.adapt_threads=false"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: lmforge pretrain failed\n{proc.stderr[-2000:]}")
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bpb = [e["val_bpb"] for e in evals if "val_bpb" in e]
    return {"lever": name, "overrides": overrides, "val_bpb": bpb[-1], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these rows (by name prefix)")
    ap.add_argument("--time", action="store_true", help="one at a time with the preset's threads")
    ap.add_argument("--parallel", type=int, default=2, help="commands at once in bpb mode")
    ap.add_argument("--parts", action="store_true", help="time the parts of one step instead")
    args = ap.parse_args()
    if args.parts:
        return step_parts()
    rows = [r for r in LEVERS if not args.only or any(r[0].startswith(o) for o in args.only)]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.time:
            results = [run(n, o, None, Path(tmp) / str(i)) for i, (n, o) in enumerate(rows)]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(args.parallel) as pool:
                jobs = [
                    pool.submit(run, n, o, 1, Path(tmp) / str(i)) for i, (n, o) in enumerate(rows)
                ]
                results = [j.result() for j in jobs]
    print(f"\n| lever | overrides | val bpb | wall s{'' if args.time else ' (under load)'} |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['lever']} | `{' '.join(r['overrides'])}` | {r['val_bpb']:.4f} | {r['wall_s']:.0f} |"
        )
    out = ROOT / "bench" / "results" / f"speedrun-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"time_mode": args.time, "results": results}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
