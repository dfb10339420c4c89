"""Catastrophic forgetting on this CPU: learn task family A, then B with each method.

    python bench/forgetting.py [--out runs/bench-forgetting] [--steps 300]

1. a small base is pretrained on the plain text of both families (``finetune``'s demo base:
   ``sort: 5 2 9 = 2 5 9`` and ``add: 1 4 + 2 3 = 3 7`` lines, plus chat examples of the other
   families) — it knows the text and the chat format, not these tasks in a chat;
2. it is fine-tuned (full) on family A (sort) in chat form → checkpoint A;
3. from checkpoint A, each method fine-tunes on family B (add) with ``--retain.path`` = A's
   held-out records; the table shows B exact match and A exact match before → after.

Both families answer in digits through the same chat template, so B's updates land on the
weights A uses. A penalty (EWC, L2-SP) trades B for A: it learns less B in the same steps. So
"keeps more of A at similar B accuracy" is checked against a full fine-tune whose learning rate
is lowered until its B matches the penalised run's (``full, lr/10``), printed at the end.
Expected shape (to be checked, not assumed): full forgets most of A; replay and EWC keep more
of A at similar B accuracy; LoRA / freeze forget less but learn B less.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.data.instructions import make_suite, write_jsonl
from lmforge.recipes.finetune import FinetuneConfig, finetune

LR = 1e-3
# name → overrides of the B fine-tune. λ's from a sweep on this bench (docs/finetune.md):
# with the Fisher normalised to mean 1, EWC λ 10 is strong already; λ ≥ 100 learns almost no B.
METHODS = {
    "full": {},
    "full, lr/10": {"optim": {"lr": LR / 10}},
    "full+replay": {"retain": {"replay_rows": 4}},
    "full+ewc": {"retain": {"ewc_lambda": 10.0}},
    "full+l2sp": {"retain": {"l2sp_lambda": 1.0}},
    "lora": {"method": "lora", "optim": {"lr": 3 * LR}},
    "freeze(top1)": {"method": "freeze", "lora": {"train_blocks": 1}},
}
MATCHED = [("full+ewc", "full, lr/10"), ("full+l2sp", "full, lr/10"), ("full+replay", "full")]


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
            optim=dict(lr=LR),
            suite=dict(families=["sort"], n_per_family=1500),
            demo_base=dict(steps=1500, families=["sort", "add"]),
        )
    )
    retain = write_jsonl(make_suite(["sort"], 200, seed=99), out / "A_heldout.jsonl")
    rows = {}
    for name, extra in METHODS.items():
        cfg = dict(
            common,
            base=a["model"],
            out_dir=str(out / name.replace(", ", "-").replace("/", "")),
            method="full",
            optim=dict(lr=LR, weight_decay=0.0),  # decay would pull towards 0, not towards A
            suite=dict(families=["add"], n_per_family=1500),
        )
        extra = json.loads(json.dumps(extra))
        cfg["optim"] |= extra.pop("optim", {})
        cfg["retain"] = {"path": str(retain), "n_eval": 60, **extra.pop("retain", {})}
        s = run({**cfg, **extra})
        rows[name] = (s["after"]["exact_match"], s["before"]["retain_em"], s["after"]["retain_em"])
    print(f"{'method':<14} {'B exact match':>14} {'A before':>9} {'A after':>8}")
    for name, (b, a0, a1) in rows.items():
        print(f"{name:<14} {b:>14.1%} {a0:>9.1%} {a1:>8.1%}")
    print("\nA kept at similar B (method vs the full fine-tune closest in B):")
    for method, reference in MATCHED:
        (b, _, a1), (rb, _, ra1) = rows[method], rows[reference]
        print(f"  {method}: B {b:.1%}, A {a1:.1%}   vs {reference}: B {rb:.1%}, A {ra1:.1%}")
    (out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
