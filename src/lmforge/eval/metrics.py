"""Evaluation metrics: thin, typed calls into the reference implementations, plus the few that
have no well-kept library home (ECE, SQuAD exact match / token F1).

Why these libraries: scikit-learn's classification metrics are the de-facto reference (every
paper's "macro-F1" is sklearn's), handle multi-class and multi-label with one API and are
CPU-only numpy; sacrebleu is the reference BLEU/chrF (standard tokenisation, reproducible
signatures — ad hoc BLEU implementations differ by points); rouge-score is Google's
re-implementation of the original ROUGE perl script used by most summarisation papers.
torchmetrics would add a second copy of the same maths behind torch tensors, so it is not used.

Perplexity and bits-per-byte live in ``eval/lm.py`` (``lm_metrics``) and are re-exported here
so that every metric has one import path and one implementation.

Training-time evaluation (``eval/classification.py``, ``eval/generation.py``) and
``lmforge eval`` all call these.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.eval.lm import lm_metrics, stream_loss_sum

__all__ = [
    "lm_metrics",
    "stream_loss_sum",
    "classification_metrics",
    "expected_calibration_error",
    "calibration_bins",
    "exact_match",
    "stripped_match",
    "final_number_match",
    "token_f1",
    "generation_metrics",
    "sentence_scores",
]


# ---- classification ----------------------------------------------------------------------------


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): Σ_bins |B|/N · |accuracy(B) − confidence(B)|.

    y_true: (N,) class ids; probs: (N, K) predicted probabilities. Bins are equal-width over
    the confidence (max probability), right-closed as in Guo et al.'s code: (0, 1/n], ….
    """
    conf, acc, count = calibration_bins(y_true, probs, n_bins)
    n = count.sum()
    return float(np.sum(count / max(n, 1) * np.abs(acc - conf)))


def calibration_bins(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: mean confidence, accuracy and count (n_bins,) each; empty bins have count 0."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    # bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 goes to bin 0
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    conf = np.bincount(which, weights=confidence, minlength=n_bins) / safe
    acc = np.bincount(which, weights=correct, minlength=n_bins) / safe
    return conf, acc, count


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    multi_label: bool = False,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Every classification metric of the report, from true labels and predicted probabilities.

    Single-label: y_true (N,) class ids, probs (N, K) softmax outputs; predictions are the
    argmax. Multi-label: y_true (N, K) 0/1, probs (N, K) sigmoid outputs; predictions are
    ``probs >= threshold`` and accuracy is subset accuracy (all labels of an example right).
    ROC-AUC is binary for K = 2, else one-vs-rest macro; PR-AUC is average precision (macro).
    AUCs are NaN when the data holds a single class (undefined).
    """
    from sklearn import metrics as skm

    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    K = len(labels)
    assert probs.shape[1] == K, (probs.shape, K)
    ids = list(range(K))
    if multi_label:
        y_pred = (probs >= threshold).astype(int)
        onehot = y_true.astype(int)
    else:
        y_pred = probs.argmax(axis=1)
        onehot = np.eye(K, dtype=int)[y_true]
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
    }
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, average=avg, labels=ids, zero_division=0
        )
        out |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, average=None, labels=ids, zero_division=0
    )
    out["per_class"] = {
        name: dict(precision=float(p[i]), recall=float(r[i]), f1=float(f[i]), support=int(s[i]))
        for i, name in enumerate(labels)
    }
    if multi_label:
        out["confusion_matrix"] = skm.multilabel_confusion_matrix(y_true, y_pred).tolist()
    else:
        out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=ids).tolist()
    present = onehot.sum(axis=0)
    both = (present > 0) & (present < len(onehot))  # classes with positives and negatives
    if K == 2 and not multi_label:
        ok = bool(both.all())
        out["roc_auc"] = float(skm.roc_auc_score(y_true, probs[:, 1])) if ok else float("nan")
        out["pr_auc"] = (
            float(skm.average_precision_score(y_true, probs[:, 1])) if ok else float("nan")
        )
    else:
        cols = np.flatnonzero(both)  # one-vs-rest over the classes where AUC is defined
        if len(cols):
            out["roc_auc"] = float(
                skm.roc_auc_score(onehot[:, cols], probs[:, cols], average="macro")
            )
            out["pr_auc"] = float(
                skm.average_precision_score(onehot[:, cols], probs[:, cols], average="macro")
            )
        else:
            out["roc_auc"] = out["pr_auc"] = float("nan")
    if not multi_label:
        out["ece"] = expected_calibration_error(y_true, probs)
    return out


# ---- extractive QA / short answers --------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def stripped_match(prediction: str, answer: str) -> bool:
    """Equal after stripping surrounding whitespace: how the synthetic instruction suite
    (``data/instructions.py``) scores an answer — case and punctuation count, unlike SQuAD's."""
    return prediction.strip() == answer.strip()


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The final answer of a worked solution: the number after GSM8K's ``####`` marker, else the
    last number in the text; thousands separators dropped, ``12.0`` → ``12``. None if no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = found[0] if "####" in text else found[-1]
    number = number.replace(",", "")
    return number[: -len(".0")] if number.endswith(".0") else number.rstrip(".")


def final_number_match(prediction: str, reference: str) -> bool:
    """True when both have a final number and they are equal (GSM8K's exact-match metric)."""
    ref = final_number(reference)
    return ref is not None and final_number(prediction) == ref


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised bag of words."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # both empty: a match; one empty: none
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- generation ------------------------------------------------------------------------------------


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def sentence_scores(prediction: str, reference: str, scorer: Any = None) -> dict[str, float]:
    """Per-example scores (for the worst-examples table and length-vs-score plot)."""
    import sacrebleu

    scorer = scorer or _rouge_scorer()
    rouge = scorer.score(reference, prediction)
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "bleu": sacrebleu.sentence_bleu(prediction, [reference]).score,
        "rougeL": rouge["rougeL"].fmeasure,
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0–100), mean ROUGE-1/2/L F1 (rouge-score, stemmed,
    0–1), mean exact match and token F1 (0–1)."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _rouge_scorer()
    rouge = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    n = max(1, len(predictions))
    return {
        "n": len(predictions),
        "bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
        "chrf": sacrebleu.corpus_chrf(list(predictions), [list(references)]).score,
        **{k: sum(s[k].fmeasure for s in rouge) / n for k in ("rouge1", "rouge2", "rougeL")},
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
    }
