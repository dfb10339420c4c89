"""Metrics against independent computations on fixed inputs: hand counts, brute-force AUC
(Mann-Whitney), a loop ECE, the official SQuAD v1.1 functions, and direct library calls."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np
import pytest

from lmforge.eval.metrics import (
    classification_metrics,
    exact_match,
    expected_calibration_error,
    generation_metrics,
    lm_metrics,
    token_f1,
)

Y = np.array([0, 0, 1, 1, 2, 2, 2, 0])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],  # wrong: predicts 1
        [0.1, 0.8, 0.1],
        [0.3, 0.3, 0.4],  # wrong: predicts 2
        [0.1, 0.1, 0.8],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],  # wrong: predicts 0
        [0.9, 0.05, 0.05],
    ]
)
LABELS = ["a", "b", "c"]


def _auc_pairs(y: np.ndarray, s: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_classification_metrics_by_hand() -> None:
    m = classification_metrics(Y, P, LABELS)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    # per class from the confusion matrix: precision = diag / column sum, recall = diag / row sum
    prec, rec = [2 / 3, 1 / 2, 2 / 3], [2 / 3, 1 / 2, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec, strict=True)]
    for i, name in enumerate(LABELS):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[i])
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    assert m["f1_weighted"] == pytest.approx(np.average(f1, weights=[3, 2, 3]))
    assert m["f1_micro"] == pytest.approx(5 / 8)  # single-label: micro F1 = accuracy
    ovr = [_auc_pairs((Y == k).astype(int), P[:, k]) for k in range(3)]
    assert m["roc_auc"] == pytest.approx(np.mean(ovr))


def test_binary_auc_and_pr_auc() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    s = np.array([0.1, 0.9, 0.35, 0.4, 0.8, 0.2, 0.6, 0.7])
    m = classification_metrics(y, np.stack([1 - s, s], 1), ["neg", "pos"])
    assert m["roc_auc"] == pytest.approx(_auc_pairs(y, s))
    # average precision by hand: mean of precision@k at each positive, ranked by score
    order = np.argsort(-s)
    hits = y[order]
    ap = np.mean([hits[: k + 1].mean() for k in range(len(y)) if hits[k]])
    assert m["pr_auc"] == pytest.approx(ap)


def test_ece_matches_a_loop() -> None:
    n_bins = 15
    total = 0.0
    conf, pred = P.max(1), P.argmax(1)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == Y[inside]).mean() - conf[inside].mean())
    assert expected_calibration_error(Y, P, n_bins) == pytest.approx(total)
    perfect = np.eye(3)[Y]
    assert expected_calibration_error(Y, perfect) == 0.0


def test_multilabel_metrics() -> None:
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    p = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.4], [0.8, 0.3, 0.1], [0.2, 0.1, 0.9]])
    m = classification_metrics(y, p, LABELS, multi_label=True)
    assert m["accuracy"] == pytest.approx(3 / 4)  # subset accuracy: example 2 misses label b
    assert m["per_class"]["b"]["recall"] == pytest.approx(1 / 2)
    assert np.asarray(m["confusion_matrix"]).shape == (3, 2, 2)


# The official SQuAD v1.1 evaluation functions (Rajpurkar et al. 2016), as the reference.
def _squad_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _squad_f1(prediction: str, ground_truth: str) -> float:
    p, g = _squad_normalize(prediction).split(), _squad_normalize(ground_truth).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0
    precision, recall = same / len(p), same / len(g)
    return (2 * precision * recall) / (precision + recall)


PAIRS = [
    ("The Eiffel Tower", "eiffel tower"),
    ("in Paris, France.", "Paris"),
    ("1889", "in 1889"),
    ("a cat sat on the mat", "the cat sat"),
    ("nothing", "something else"),
]


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_exact_match_and_token_f1_match_squad(pred: str, ref: str) -> None:
    assert exact_match(pred, ref) == float(_squad_normalize(pred) == _squad_normalize(ref))
    assert token_f1(pred, ref) == pytest.approx(_squad_f1(pred, ref))


def test_generation_metrics_against_libraries() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a dog barked loudly at night", "hello world"]
    refs = ["the cat is on the mat", "the dog barked at night", "hello world"]
    m = generation_metrics(preds, refs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    # ROUGE-1 of pair 0 by hand: 5 of 6 unigrams shared both ways → F1 = 5/6
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    assert scorer.score(refs[0], preds[0])["rouge1"].fmeasure == pytest.approx(5 / 6)
    assert generation_metrics(refs, refs)["bleu"] == pytest.approx(100.0)
    assert m["exact_match"] == pytest.approx(1 / 3)


def test_perplexity_and_bpb_are_the_lm_module() -> None:
    m = lm_metrics(loss_sum=2.0 * 100, n_tokens=100, n_bytes=400)
    assert m["val_ppl"] == pytest.approx(math.exp(2.0))
    assert m["val_bpb"] == pytest.approx(200 / math.log(2) / 400)


def test_final_number_reads_gsm8k_answers_and_free_text() -> None:
    from lmforge.eval.metrics import final_number, final_number_match

    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"
    assert final_number(ref) == "1072"
    assert final_number("so she earned $10.00 in total. The answer is 10.") == "10"
    assert final_number("12.0") == "12" and final_number("no digits") is None
    assert final_number_match("... which makes 1072 clips", ref)
    assert not final_number_match("1072 clips, minus 5 is 1067", ref)  # the last number counts
    assert not final_number_match("1072", "no number here")
