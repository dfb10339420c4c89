"""Distillation, measured honestly: the distilled student vs the same student trained alone.

Both arms run ``lmforge distill``'s own code (``recipes/distill.py``) with the same teacher,
student architecture, training text, steps, batches (same seed → same windows in the same
order), initial weights (same seed), optimizer and schedule; the only difference is the loss:

    distilled   α = --alpha, T = --temperature: α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE
    alone       α = 0: plain next-token cross-entropy (the teacher still runs, unused)

Several seeds; the table gives each arm's held-out bits-per-byte (the last ``--eval-bytes`` of
TinyShakespeare, never trained on) as mean ± standard deviation, the per-seed difference, and
the teacher's own figure.

    python bench/distill.py --teacher runs/pretrain-…     # a demo LM run folder as teacher
    python bench/distill.py --quick                        # smoke test (trains a tiny teacher)

Writes bench/results/distill-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.cli import resolve_config
from lmforge.config import parse_overrides
from lmforge.recipes.distill import DistillConfig, distill

RESULTS = Path(__file__).resolve().parent / "results"


def run_arm(teacher: str, seed: int, alpha: float, out: Path, args: argparse.Namespace) -> dict:
    overrides: dict[str, Any] = {
        "teacher": teacher,
        "out_dir": str(out),
        "alpha": alpha,
        "temperature": args.temperature,
        "max_eval_bytes": args.eval_bytes,
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.eval_every": args.steps,
        "train.save_every": args.steps,
        "train.seed": seed,
        "train.num_threads": args.threads,
        "sched.warmup_steps": max(1, args.steps // 10),
        "student.n_layer": args.student_layers,
        "student.d_model": args.student_width,
        "student.n_head": 4,
        "student.context_length": args.context,
    }
    if args.top_k:
        overrides["top_k"] = args.top_k
    return distill(resolve_config("distill", None, _typed(overrides, DistillConfig)))


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help="teacher checkpoint or run folder; default: train a demo LM")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-width", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--eval-bytes", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_bytes, args.batch_size = [0, 1], 6, 3000, 4
        args.student_width, args.context = 32, 32
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    teacher = args.teacher
    if teacher is None:
        from lmforge.recipes.pretrain import pretrain

        steps = 10 if args.quick else 300
        from lmforge.recipes.pretrain import PretrainConfig

        raw = {
            "out_dir": str(work / "teacher"),
            "train.precision": "fp32",
            "train.max_steps": steps,
        }
        cfg = resolve_config("pretrain", None, _typed(raw, PretrainConfig))
        teacher = pretrain(cfg)["run_dir"]
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:  # the two arms alternate, seed by seed
        for arm, alpha in (("distilled", args.alpha), ("alone", 0.0)):
            s = run_arm(teacher, seed, alpha, work / f"{arm}-{seed}", args)
            runs.append({"arm": arm, "seed": seed, **s})
            print(f"seed {seed} {arm}: val bpb {s['student_val_bpb']:.4f}", flush=True)
    bpb = {arm: [r["student_val_bpb"] for r in runs if r["arm"] == arm]
           for arm in ("distilled", "alone")}  # fmt: skip
    diff = [d - a for d, a in zip(bpb["distilled"], bpb["alone"], strict=True)]
    first = runs[0]
    lines = [
        f"teacher `{teacher}`: {first['teacher_parameters']:,} parameters, val bpb "
        f"{first['teacher_val_bpb']:.4f}; student {first['student_parameters']:,} parameters, "
        f"{args.steps} steps × {args.batch_size} × {args.context} tokens, seeds {args.seeds}",
        "",
        "| student | val bits-per-byte, mean ± sd | per seed |",
        "|---|---:|---|",
        f"| distilled (α {args.alpha}, T {args.temperature}"
        + (f", top-{args.top_k}" if args.top_k else "")
        + f") | {_mean_sd(bpb['distilled'])} | {', '.join(f'{x:.4f}' for x in bpb['distilled'])} |",
        f"| alone (α 0) | {_mean_sd(bpb['alone'])} | {', '.join(f'{x:.4f}' for x in bpb['alone'])} |",
        f"| distilled − alone | {_mean_sd(diff)} | {', '.join(f'{x:+.4f}' for x in diff)} |",
    ]
    print("\n".join(lines))
    stem = args.out or f"distill-{datetime.now():%Y%m%d-%H%M}"
    RESULTS.mkdir(exist_ok=True)
    out = {"date": datetime.now().isoformat(timespec="minutes"), "command": " ".join(sys.argv),
           "torch": torch.__version__, "runs": runs, "difference": diff}  # fmt: skip
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / stem}.json and .md")


def _typed(overrides: dict[str, Any], config: type) -> dict[str, Any]:
    """Dotted settings as the command line gives them (``--train.seed=1``), typed by field."""
    return parse_overrides([f"--{k}={v}" for k, v in overrides.items()], config)


if __name__ == "__main__":
    main()
