"""Catastrophic forgetting on this CPU: learn task family A, then B with each method.

    python bench/forgetting.py [--out runs/bench-forgetting] [--steps 300]

1. a small base is pretrained on the plain text of both families (``finetune``'s demo base:
   ``sort: 5 2 9 = 2 5 9`` and ``add: 1 4 + 2 3 = 3 7`` lines) — it knows the text, not the chat;
2. it is fine-tuned (full) on family A (sort) in chat form → checkpoint A;
3. from checkpoint A, each method fine-tunes on family B (add) with ``--retain.path`` = A's
   held-out records; the table shows B exact match and A exact match before → after.

Both families answer in digits through the same chat template, so B's updates land on the
weights A uses. Expected shape (to be checked, not assumed): full forgets much of A; replay and
EWC keep more of A at similar B accuracy; LoRA / freeze forget less but learn B less.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.data.instructions import make_suite, write_jsonl
from lmforge.recipes.finetune import FinetuneConfig, finetune

METHODS = {
    "full": {"method": "full"},
    "full+replay": {"method": "full", "retain": {"replay_rows": 4}},
    "full+ewc": {"method": "full", "retain": {"ewc_lambda": 100.0}},
    "full+l2sp": {"method": "full", "retain": {"l2sp_lambda": 10.0}},
    "lora": {"method": "lora", "optim": {"lr": 3e-3}},
    "freeze(top1)": {"method": "freeze", "lora": {"train_blocks": 1}},
}


def run(cfg: dict) -> dict:
    return finetune(FinetuneConfig.model_validate(cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-forgetting")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    train = dict(max_steps=args.steps, batch_size=16, eval_every=args.steps, save_every=args.steps)
    common = dict(train=train, sched=dict(warmup_steps=10), n_eval=60)
    a = run(
        dict(
            common,
            out_dir=str(out / "A"),
            method="full",
            optim=dict(lr=1e-3),
            suite=dict(families=["sort"], n_per_family=1500),
            demo_base=dict(steps=1500, families=["sort", "add"]),
        )
    )
    retain = write_jsonl(make_suite(["sort"], 200, seed=99), out / "A_heldout.jsonl")
    rows = []
    for name, extra in METHODS.items():
        cfg = dict(
            common,
            base=a["model"],
            out_dir=str(out / name),
            optim=dict(lr=1e-3),
            suite=dict(families=["add"], n_per_family=1500),
        )
        cfg["retain"] = {"path": str(retain), "n_eval": 60, **extra.pop("retain", {})}
        s = run({**cfg, **extra})
        rows.append(
            (name, s["after"]["exact_match"], s["before"]["retain_em"], s["after"]["retain_em"])
        )
    print(f"{'method':<14} {'B exact match':>14} {'A before':>9} {'A after':>8}")
    for name, b, a0, a1 in rows:
        print(f"{name:<14} {b:>14.1%} {a0:>9.1%} {a1:>8.1%}")
    (out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
