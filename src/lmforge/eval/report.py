"""The eval report folder: ``report.json`` (everything), ``report.md`` (for people), ``plots/``.

<out>/eval/report.json   metrics, per-class table, confusion matrix, worst examples
<out>/eval/report.md     the same as tables, linking the plots
<out>/eval/plots/*.png   confusion.png, roc.png, pr.png, calibration.png | length_vs_score.png
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_write_text
from lmforge.eval import plots


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None  # JSON has no NaN
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]


def write_report(
    out_dir: Path,
    title: str,
    metrics: dict[str, Any],
    worst: list[dict[str, Any]],
    plot_files: list[Path],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write report.json and report.md into ``out_dir`` (created); returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = info or {}
    report = {"title": title, **info, "metrics": metrics, "worst_examples": worst}
    report["plots"] = [str(p.relative_to(out_dir)) for p in plot_files]
    atomic_write_text(out_dir / "report.json", json.dumps(_json_safe(report), indent=2) + "\n")

    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()] + [""]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()] + [""]
    if per_class := metrics.get("per_class"):
        lines += ["## Per class", "", "| class | precision | recall | F1 | support |"]
        lines += ["|---|---|---|---|---|"]
        for name, row in per_class.items():
            vals = " | ".join(_fmt(row[k]) for k in ("precision", "recall", "f1", "support"))
            lines.append(f"| {_cell(name)} | {vals} |")
        lines.append("")
    if plot_files:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in plot_files] + [""]
    if worst:
        keys = list(worst[0])
        lines += [f"## Worst {len(worst)} examples", ""]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(_fmt(w[k])) for k in keys) + " |" for w in worst]
        lines.append("")
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return out_dir


def classification_report(
    out_dir: Path,
    metrics: dict[str, Any],
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    texts: Sequence[str],
    info: dict[str, Any] | None = None,
    n_worst: int = 20,
) -> Path:
    """Report + plots for a classifier. Worst examples: lowest probability of the true class
    (single-label) or highest mean absolute error over labels (multi-label)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    multi = y_true.ndim == 2
    pdir = out_dir / "plots"
    files = []
    if not multi:
        files.append(
            plots.plot_confusion(metrics["confusion_matrix"], labels, pdir / "confusion.png")
        )
    files.append(plots.plot_roc(y_true, probs, labels, pdir / "roc.png"))
    files.append(plots.plot_pr(y_true, probs, labels, pdir / "pr.png"))
    if not multi:
        files.append(plots.plot_calibration(y_true, probs, pdir / "calibration.png"))
    if multi:
        badness = np.abs(probs - y_true).mean(axis=1)
    else:
        badness = -probs[np.arange(len(y_true)), y_true]
    worst = []
    for i in np.argsort(-badness, kind="stable")[:n_worst]:
        if multi:
            true = ",".join(labels[k] for k in np.flatnonzero(y_true[i])) or "-"
            pred = ",".join(labels[k] for k in np.flatnonzero(probs[i] >= 0.5)) or "-"
            score = float(1 - badness[i])
        else:
            true, pred = labels[y_true[i]], labels[int(probs[i].argmax())]
            score = float(probs[i, y_true[i]])
        worst.append(
            {"index": int(i), "text": texts[i], "true": true, "predicted": pred, "p_true": score}
        )
    return write_report(out_dir, "Classification evaluation", metrics, worst, files, info)


def generation_report(
    out_dir: Path,
    metrics: dict[str, Any],
    prompts: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    per_example: Sequence[dict[str, float]],
    info: dict[str, Any] | None = None,
    score_key: str = "rougeL",
    n_worst: int = 20,
) -> Path:
    """Report + length-vs-score plot for generations; worst = lowest ``score_key``."""
    scores = [s[score_key] for s in per_example]
    lengths = [len(r.split()) for r in references]
    files = [
        plots.plot_length_vs_score(
            lengths, scores, score_key, out_dir / "plots" / "length_vs_score.png"
        )
    ]
    order = np.argsort(scores, kind="stable")[:n_worst]
    worst = [
        {
            "index": int(i),
            "prompt": prompts[i],
            "reference": references[i],
            "prediction": predictions[i],
            score_key: scores[i],
        }
        for i in order
    ]
    return write_report(out_dir, "Generation evaluation", metrics, worst, files, info)
