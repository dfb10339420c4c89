"""Classification evaluation: probabilities of a sequence or image classifier and every report
metric.

``lmforge classify`` / ``classify-image`` evaluate with these while training and on their test
data; ``lmforge eval`` of a classifier checkpoint calls ``evaluate_classifier`` /
``evaluate_image_classifier``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint.load import Loaded
from lmforge.config import read_yaml, validate_config
from lmforge.data.classification import (
    ClassifyDataConfig,
    Example,
    collate,
    encode_labels,
    encode_texts,
    read_examples,
)
from lmforge.data.images import (
    ImageDataConfig,
    ImageSet,
    read_images,
    read_splits,
    resize,
    to_model_input,
)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.eval.metrics import classification_metrics
from lmforge.eval.mode import eval_mode
from lmforge.eval.report import classification_report
from lmforge.models.encoder import SequenceClassifier
from lmforge.models.vit import ImageClassifier


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


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number metrics (for summaries and metrics.jsonl)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "n"}


def shown_text(e: Example) -> str:
    """An example as the report's worst-examples table shows it."""
    return e.text if e.text_pair is None else f"{e.text} ||| {e.text_pair}"


def evaluate_classifier(
    loaded: Loaded, data: str, batch_size: int, device: torch.device, out_dir: str | None
) -> dict[str, Any]:
    """Metrics + report folder of a classifier checkpoint (``checkpoint.load``) on a labelled
    file (same columns as its training data). The report goes to ``out_dir``, else
    ``<run folder>/eval``."""
    model, tokenizer, manifest = loaded
    ckpt = manifest.path
    if manifest.source != "lmforge":
        raise CheckpointError(
            f"{ckpt}: a {manifest.source} classifier has no lmforge classify config (data "
            "columns, labels); fine-tune it with `lmforge classify --init` to evaluate it"
        )
    saved = read_yaml(ckpt / "config.yaml")  # the classify run's config: data columns, labels
    data_cfg = validate_config(
        ClassifyDataConfig, saved.get("data", {}), f"{ckpt / 'config.yaml'} (data)"
    )
    examples = read_examples(data, data_cfg)
    labels = data_cfg.labels or []
    y = encode_labels(examples, labels, data_cfg.multi_label)
    rows = encode_texts(tokenizer, examples, data_cfg.max_length)
    pad_id = model.encoder.cfg.pad_id
    metrics, probs = evaluate_rows(model, rows, y, labels, batch_size, device, pad_id)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    out = Path(out_dir) if out_dir else run_dir / "eval"
    info = {"checkpoint": str(ckpt), "data": data, "labels": ", ".join(labels)}
    classification_report(out, metrics, y, probs, labels, [shown_text(e) for e in examples], info)
    return {
        "checkpoint": str(ckpt),
        "data": data,
        "report": str(out / "report.md"),
        **scalars(metrics),
    }


# Image classifiers (lmforge classify-image): the same metrics on pixels


def image_probs(
    model: ImageClassifier, images: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Softmax probabilities (N, K) of [0, 1] images (N, C, H, W), in data order."""
    out = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_model_input(torch.from_numpy(images[i : i + batch_size]).to(device))
            out.append(model(x).float().softmax(-1).cpu().numpy())
    return np.concatenate(out)


def evaluate_images(
    model: ImageClassifier, data: ImageSet, batch_size: int, device: torch.device
) -> tuple[dict[str, Any], np.ndarray]:
    """(metrics incl. the mean ``loss`` in nats, probabilities) on a labelled image set."""
    probs = image_probs(model, data.images, batch_size, device)
    metrics = classification_metrics(data.labels, probs, data.names)
    p = np.clip(probs[np.arange(len(data)), data.labels], 1e-12, 1.0)
    metrics["loss"] = float(-np.log(p).mean())
    return metrics, probs


def evaluate_image_classifier(
    loaded: Loaded, data: str | None, batch_size: int, device: torch.device, out_dir: str | None
) -> dict[str, Any]:
    """Metrics + report folder of an image-classifier checkpoint on ``data`` (a folder of class
    folders or an .npz, resized to the model's input) or, with ``data`` None, on the test split
    of the ``classify-image`` run that wrote it (re-made from its config.yaml). The report goes
    to ``out_dir``, else ``<run folder>/eval``."""
    model, _, manifest = loaded
    ckpt = manifest.path
    names = model.label_names
    if data is not None:
        test = read_images(data, names=names)
        test.images = resize(test.images, model.cfg.image_size)
        if test.images.shape[1] != model.cfg.num_channels:
            raise ConfigError(f"data: {data} has {test.images.shape[1]} colour channels; the "
                              f"model reads {model.cfg.num_channels}")  # fmt: skip
        shown = data
    elif manifest.source == "lmforge" and (ckpt / "config.yaml").is_file():
        saved = read_yaml(ckpt / "config.yaml")  # the classify-image run's data section
        where = f"{ckpt / 'config.yaml'} (data)"
        dcfg = validate_config(ImageDataConfig, saved.get("data", {}), where)
        test = read_splits(dcfg)[2]
        shown = f"{test.source} (test split)" if dcfg.test is None else test.source
    else:
        raise ConfigError(f"{ckpt}: a {manifest.source} image classifier has no run config to "
                          "re-make a test split from; give --data=FOLDER_OR_NPZ")  # fmt: skip
    metrics, probs = evaluate_images(model, test, batch_size, device)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    out = Path(out_dir) if out_dir else run_dir / "eval"
    info = {"checkpoint": str(ckpt), "data": shown, "labels": ", ".join(names)}
    rows = [f"image {i}" for i in range(len(test))]
    classification_report(out, metrics, test.labels, probs, names, rows, info)
    return {"checkpoint": str(ckpt), "data": shown, "report": str(out / "report.md"),
            **scalars(metrics)}  # fmt: skip
