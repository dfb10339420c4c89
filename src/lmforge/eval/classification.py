"""Classification evaluation: probabilities of a sequence classifier and every report metric.

``lmforge classify`` evaluates with these while training and on its test file; ``lmforge eval``
of a classifier checkpoint goes through ``recipes.classify.evaluate_classifier`` to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.data.classification import collate
from lmforge.eval.metrics import classification_metrics
from lmforge.eval.mode import eval_mode
from lmforge.models.encoder import SequenceClassifier


def predict_probs(
    model: SequenceClassifier,
    rows: list[tuple[list[int], list[int]]],
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> np.ndarray:
    """Probabilities (N, K): softmax (single-label) or sigmoid (multi-label), in data order.

    rows: (token ids, token type ids) per example, as ``data.classification.encode_texts``."""
    out = []
    multi = model.head_cfg.task == "multilabel"
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
            logits = model(b["idx"], b["token_types"], b["attention_mask"]).float()  # (B, K)
            out.append((logits.sigmoid() if multi else logits.softmax(-1)).cpu().numpy())
    return np.concatenate(out)


def evaluate_rows(
    model: SequenceClassifier,
    rows: list[tuple[list[int], list[int]]],
    y: np.ndarray,
    labels: list[str],
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """(metrics incl. the mean ``loss`` in nats, probabilities) of ``model`` on encoded rows."""
    probs = predict_probs(model, rows, batch_size, device, pad_id)
    multi = model.head_cfg.task == "multilabel"
    metrics = classification_metrics(y, probs, labels, multi_label=multi)
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    if multi:
        metrics["loss"] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    else:
        metrics["loss"] = float(-np.log(p[np.arange(len(y)), y]).mean())
    return metrics, probs
