"""The CPU speedrun of the main job: `lmforge pretrain` (no arguments) and the levers tried on it.

Issue 18 asks for val bits-per-byte ≤ 2.05 on TinyShakespeare's last 10 % with the whole
command in ≤ 300 s on a 2-core CPU. Each lever below is one set of overrides on the shipped
``cpu_demo`` preset; the quality column is the final val bits-per-byte (deterministic on one
host: thread count does not change the bits), the time column the whole command's wall time.

    python bench/speedrun.py                      # every lever, its bpb (2 at a time, 1 thread each)
    python bench/speedrun.py --only default --time   # `lmforge pretrain` timed alone, 2 threads
    python bench/speedrun.py --only "300 steps" "+ wsd" --parallel 1

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
OLD = ["--optim.name=adamw", "--sched.name=cosine", "--sched.min_lr_ratio=0.1", "--optim.lr=2e-3"]
# (row, overrides). "default" is the preset as shipped; the others start from the preset
# before this issue (450 steps, AdamW, cosine to 10 %) so each row shows one lever's effect.
LEVERS: list[tuple[str, list[str]]] = [
    ("default", []),
    ("before: 450 steps, cosine to 10 %", [*OLD, "--train.max_steps=450"]),
    ("300 steps (what fits in 300 s here)", [*OLD, "--train.max_steps=300"]),
    ("+ linear decay to 0", [*OLD, "--train.max_steps=300", "--sched.name=linear",
                             "--sched.min_lr_ratio=0"]),
    ("+ wsd (stable, last 30 % to 0)", [*OLD, "--train.max_steps=300", "--sched.name=wsd",
                                        "--sched.min_lr_ratio=0"]),
    ("+ wsd, lr 4e-3", [*OLD, "--train.max_steps=300", "--sched.name=wsd",
                        "--sched.min_lr_ratio=0", "--optim.lr=4e-3"]),
    ("+ wsd, Muon", [*OLD, "--train.max_steps=300", "--sched.name=wsd",
                     "--sched.min_lr_ratio=0", "--optim.name=muon"]),
    ("+ wsd, batch 16 x 600 steps", [*OLD, "--train.max_steps=600", "--train.batch_size=16",
                                     "--sched.name=wsd", "--sched.min_lr_ratio=0"]),
]  # fmt: skip


def run(name: str, overrides: list[str], threads: int | None, out: Path) -> dict:
    """One `lmforge pretrain` in a fresh process; its final val bpb and wall time."""
    cmd = [sys.executable, "-m", "lmforge", "pretrain", f"--out_dir={out}", *overrides]
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
    args = ap.parse_args()
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
