"""Evaluation plots (matplotlib, headless): confusion matrix, ROC, precision-recall, calibration,
and length-vs-score for generation. Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmforge.eval.metrics import calibration_bins


def _figure(size: tuple[float, float] = (5.0, 4.5)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> Path:
    """Counts, rows = true class, columns = predicted (as sklearn's confusion_matrix)."""
    cm = np.asarray(cm)
    plt, fig, ax = _figure((1.2 + 0.6 * len(labels),) * 2)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if cm[i, j] > top / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_title("confusion matrix")
    return _save(plt, fig, path)


def _one_vs_rest(y_true: np.ndarray, K: int) -> np.ndarray:
    return y_true.astype(int) if y_true.ndim == 2 else np.eye(K, dtype=int)[y_true]


def plot_roc(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """One ROC curve per class (one-vs-rest; only the positive class when binary)."""
    from sklearn.metrics import auc, roc_curve

    onehot = _one_vs_rest(np.asarray(y_true), len(labels))
    plt, fig, ax = _figure()
    classes = [1] if len(labels) == 2 and np.asarray(y_true).ndim == 1 else range(len(labels))
    for k in classes:
        if 0 < onehot[:, k].sum() < len(onehot):
            fpr, tpr, _ = roc_curve(onehot[:, k], probs[:, k])
            ax.plot(fpr, tpr, label=f"{labels[k]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def plot_pr(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """One precision-recall curve per class (one-vs-rest), with its average precision."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    onehot = _one_vs_rest(np.asarray(y_true), len(labels))
    plt, fig, ax = _figure()
    classes = [1] if len(labels) == 2 and np.asarray(y_true).ndim == 1 else range(len(labels))
    for k in classes:
        if onehot[:, k].sum() > 0:
            p, r, _ = precision_recall_curve(onehot[:, k], probs[:, k])
            ap = average_precision_score(onehot[:, k], probs[:, k])
            ax.plot(r, p, label=f"{labels[k]} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall")
    ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)


def plot_calibration(y_true: np.ndarray, probs: np.ndarray, path: Path, n_bins: int = 15) -> Path:
    """Reliability diagram: accuracy vs confidence per non-empty bin (the diagonal is perfect)."""
    conf, acc, count = calibration_bins(y_true, probs, n_bins)
    used = count > 0
    plt, fig, ax = _figure()
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.plot(conf[used], acc[used], "o-", label="model")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("calibration")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_length_vs_score(
    lengths: Sequence[int], scores: Sequence[float], metric: str, path: Path
) -> Path:
    """Per-example score against reference length (words): do long targets fail more?"""
    plt, fig, ax = _figure()
    ax.scatter(lengths, scores, s=10, alpha=0.6)
    ax.set_xlabel("reference length (words)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs length")
    return _save(plt, fig, path)
