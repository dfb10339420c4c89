"""Does EDA augmentation help a classifier with few labels? Measured, several seeds.

Few-shot support-ticket intents (the shipped set): K examples per label drawn per seed, MiniLM
(the `lmforge classify` preset), the same steps with and without ``--augment.copies``; the
shipped val split picks the best checkpoint, the shipped test split (400 tickets) scores it.
Reports test accuracy and macro-F1, mean and spread over seeds — whichever way it comes out.

    python bench/augment_text.py                 # 8 per label, 3 seeds (≈ 10 min on 2 cores)
    python bench/augment_text.py --quick         # smoke test: 1 seed, few steps
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "src" / "lmforge" / "data" / "corpora"


def few_shot(k: int, seed: int, out: Path) -> Path:
    with open(CORPORA / "support_tickets_train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    picked = []
    for label in sorted({r["label"] for r in rows}):
        picked += rng.sample([r for r in rows if r["label"] == label], k)
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(picked)
    return out


def run(train: Path, copies: int, seed: int, steps: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "lmforge", "classify", f"--out_dir={out}",
           f"--data.train={train}", f"--data.val={CORPORA / 'support_tickets_val.csv'}",
           f"--data.test={CORPORA / 'support_tickets_test.csv'}", f"--augment.copies={copies}",
           f"--train.seed={seed}", f"--train.max_steps={steps}", "--train.eval_every=20",
           "--train.save_every=20", "--train.early_stop_patience=0"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    s = json.loads((out / "summary.json").read_text())
    return {"accuracy": s["eval_accuracy"], "f1_macro": s["eval_f1_macro"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=8, help="examples per label")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps = 1, 4
    results: dict[str, list[dict[str, float]]] = {"no augmentation": [], f"EDA x{args.copies}": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            train = few_shot(args.k, seed, Path(tmp) / f"train{seed}.csv")
            for name, copies in (("no augmentation", 0), (f"EDA x{args.copies}", args.copies)):
                r = run(train, copies, seed, args.steps, Path(tmp) / f"{name[:3]}{seed}")
                results[name].append(r)
                print(f"seed {seed} {name:16s} accuracy {r['accuracy']:.3f} "
                      f"macro-F1 {r['f1_macro']:.3f}", flush=True)  # fmt: skip

    def cell(rows: list[dict[str, float]], key: str) -> str:
        v = [r[key] for r in rows]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.3f} ± {sd:.3f} ({min(v):.3f}–{max(v):.3f})"

    lines = [f"{args.k} tickets per label (4 labels), MiniLM-L6, {args.steps} steps, "
             f"{args.seeds} seeds; test split of 400 tickets; mean ± sd (min–max)", "",
             "| training data | test accuracy | test macro-F1 |", "|---|---:|---:|"]  # fmt: skip
    for name, rows in results.items():
        lines.append(f"| {name} | {cell(rows, 'accuracy')} | {cell(rows, 'f1_macro')} |")
    table = "\n".join(lines)
    print("\n" + table)
    if not args.quick:
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / f"augment_text-{datetime.now():%Y%m%d-%H%M}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
