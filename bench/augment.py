"""Test accuracy of the digits ViT with and without augmentation, over several seeds.

Each run is `lmforge classify-image`'s demo (sklearn's 8×8 digits, the same stratified
train/val/test split every time, best checkpoint by val accuracy) with only ``augment.enabled``
and ``train.seed`` (weights init, batch order, augmentation draws) changed. Augmentation is the
default kornia pipeline (crop p=0.5, colour jitter p=0.5, noise p=0.3; no flip: a mirrored digit
is another glyph) plus, in a third arm, MixUp/CutMix on half the batches. Printed: per-seed test
accuracy / macro-F1, and mean ± sample standard deviation per arm.

    PYTHONPATH=src python bench/augment.py    # 3 seeds × 3 arms (617 s, 1 thread)
    python bench/augment.py --val-fraction 0.85     # low data: 216 training images
    python bench/augment.py --seeds 1 --steps 40   # smoke test: checks that it runs, no figure
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from lmforge.recipes.classify_image import ClassifyImageConfig, classify_image

ARMS = {
    "no augmentation": {"augment": {"enabled": False}},
    "augmentation": {},
    "augmentation + MixUp/CutMix": {"augment": {"mix_p": 0.5}},
}


def run_arm(arm: dict, seed: int, steps: int, out: Path, val_fraction: float) -> dict[str, float]:
    base = ClassifyImageConfig().model_dump()
    base["data"]["val_fraction"] = val_fraction
    base["train"] |= {"seed": seed, "max_steps": steps, "num_threads": 1}
    base["train"]["eval_every"] = max(1, min(base["train"]["eval_every"], steps))
    base["sched"]["warmup_steps"] = min(base["sched"]["warmup_steps"], steps // 10)
    for section, values in arm.items():
        base[section] |= values
    base["out_dir"] = str(out)
    summary = classify_image(ClassifyImageConfig.model_validate(base))
    return {k: summary[f"eval_{k}"] for k in ("accuracy", "f1_macro")} | {"steps": summary["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=900, help="max steps (the demo's default)")
    ap.add_argument("--val-fraction", type=float, default=ClassifyImageConfig().data.val_fraction,
                    help="of the non-test images, the val split: 0.85 leaves ~15 %% (216 "
                    "images) to train on, the low-data setting")  # fmt: skip
    ap.add_argument("--out", default="bench/results/augment.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in ARMS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # arms alternate inside each seed (same machine load)
            for name, arm in ARMS.items():
                out = Path(tmp) / f"{seed}-{len(rows[name])}-{name}"
                r = run_arm(arm, seed, args.steps, out, args.val_fraction)
                rows[name].append(r)
                print(f"seed {seed} {name:30s} accuracy {r['accuracy']:.4f} "
                      f"macro-F1 {r['f1_macro']:.4f} ({r['steps']} steps)", flush=True)  # fmt: skip
    print(f"\n| arm | test accuracy, mean ± sd ({args.seeds} seeds) | macro-F1 | per seed |")
    print("|---|---|---|---|")
    table = {}
    for name, rs in rows.items():
        acc = [r["accuracy"] for r in rs]
        f1 = [r["f1_macro"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        sd_f1 = statistics.stdev(f1) if len(f1) > 1 else 0.0
        table[name] = {"accuracy": acc, "f1_macro": f1}
        print(f"| {name} | {statistics.mean(acc):.4f} ± {sd:.4f} | "
              f"{statistics.mean(f1):.4f} ± {sd_f1:.4f} | "
              f"{', '.join(f'{a:.4f}' for a in acc)} |")  # fmt: skip
    print(f"\n{time.perf_counter() - t0:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"steps": args.steps, "val_fraction": args.val_fraction, "arms": table}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
