"""Classifier evaluation: probabilities in data order, independent of the batch (padding), the
metrics' loss is the mean negative log-probability of the true class, the mode is restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.eval.classification import evaluate_rows, predict_probs
from lmforge.models.encoder import Encoder, EncoderConfig, HeadConfig, SequenceClassifier


@pytest.mark.parametrize("task", ["sequence", "multilabel"])
def test_probabilities_do_not_depend_on_the_batch(task: str) -> None:
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=40, context_length=16, n_layer=1, n_head=2, d_model=16)
    model = SequenceClassifier(Encoder(cfg), HeadConfig(task=task, num_labels=3)).train()
    g = np.random.default_rng(0)
    rows = [(list(g.integers(1, 40, n)), [0] * n) for n in (3, 9, 5, 12, 2)]
    cpu = torch.device("cpu")
    one = predict_probs(model, rows, 1, cpu, pad_id=0)  # (5, 3), no padding at all
    batched = predict_probs(model, rows, 4, cpu, pad_id=0)
    np.testing.assert_allclose(batched, one, rtol=1e-5, atol=1e-6)
    assert model.training  # dropout was off while predicting, back on after
    if task == "sequence":
        np.testing.assert_allclose(one.sum(axis=1), 1.0, rtol=1e-6)
        y = np.array([0, 1, 2, 1, 0])
        metrics, probs = evaluate_rows(model, rows, y, ["a", "b", "c"], 2, cpu, 0)
        assert metrics["loss"] == pytest.approx(float(-np.log(probs[np.arange(5), y]).mean()))
        assert metrics["n"] == 5
