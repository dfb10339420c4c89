"""What a compression step costs and saves, measured the same way for every step.

Quality: a decoder's bits-per-byte on held-out text (``eval/lm.py``), a sequence classifier's
accuracy and macro-F1 on a labelled file (``eval/classification.py``). Saving: the bytes of
``model.safetensors`` and the parameter count. The bench adds generation speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer
from torch import nn

from lmforge.checkpoint.manifest import Manifest
from lmforge.config import Section
from lmforge.errors import ConfigError

SHIPPED_TEXT = Path(__file__).resolve().parents[1] / "data" / "corpora" / "tinyshakespeare.txt"
SHIPPED_LABELLED = SHIPPED_TEXT.parent / "support_tickets_test.csv"
SHIPPED_CHINESE = SHIPPED_TEXT.parent / "chinese_classical.txt"


def read_text(path: str | Path, what: str = "data") -> str:
    """A UTF-8 text file (``pkg:PACKAGE/FILE`` names a shipped one); a missing or binary file
    is a ``ConfigError`` naming it."""
    from lmforge.config import package_path

    path = package_path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path}: no such file (give a UTF-8 text file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path}: not UTF-8 text (byte {e.start})") from None


def held_out(text: str, max_bytes: int) -> str:
    """The last ``max_bytes`` bytes of ``text`` from a line start: the demo LM and most
    splits (lmforge pretrain: the last 10 %) hold out the end of a text file."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    tail = raw[-max_bytes:].decode("utf-8", errors="ignore")
    cut = tail.find("\n")
    return tail[cut + 1 :] if 0 <= cut < len(tail) - 1 else tail


def lm_quality(
    model: nn.Module, tokenizer: Tokenizer, text: str, batch_size: int = 8
) -> dict[str, float]:
    """``val_loss`` (nats/token), ``val_ppl`` and ``val_bpb`` of a decoder on ``text``."""
    from lmforge.eval.lm import lm_metrics, stream_loss_sum

    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    if len(ids) < 2:
        raise ConfigError("data: the evaluation text holds fewer than 2 tokens")
    context = model.cfg.context_length
    loss_sum, n = stream_loss_sum(model, ids, context, batch_size, torch.device("cpu"))
    return lm_metrics(loss_sum, n, len(text.encode("utf-8")))


def classifier_quality(
    model: nn.Module, tokenizer: Tokenizer, manifest: Manifest, data: str, batch_size: int = 32
) -> dict[str, float]:
    """``accuracy`` and ``f1_macro`` of a classifier (an lmforge classify checkpoint, whose
    config.yaml names the data columns and labels) on the labelled file ``data``."""
    from lmforge.config import read_yaml, validate_config
    from lmforge.data.classification import (
        ClassifyDataConfig,
        encode_labels,
        encode_texts,
        read_examples,
    )
    from lmforge.eval.classification import evaluate_rows

    cfg_path = Path(manifest.path or ".") / "config.yaml"
    if manifest.source != "lmforge" or not cfg_path.is_file():
        raise ConfigError(
            f"{manifest.path}: quality of a classifier is measured with its lmforge classify "
            "config (data columns, labels); fine-tune it with `lmforge classify --init` first"
        )
    saved = read_yaml(cfg_path)
    data_cfg = validate_config(ClassifyDataConfig, saved.get("data", {}), f"{cfg_path} (data)")
    examples = read_examples(data, data_cfg)
    labels = data_cfg.labels or []
    y = encode_labels(examples, labels, data_cfg.multi_label)
    rows = encode_texts(tokenizer, examples, data_cfg.max_length)
    pad_id = model.encoder.cfg.pad_id
    metrics, _ = evaluate_rows(model, rows, y, labels, batch_size, torch.device("cpu"), pad_id)
    return {"accuracy": float(metrics["accuracy"]), "f1_macro": float(metrics["f1_macro"])}


class ExactMatchConfig(Section):
    """A chat model's task quality, scored as ``lmforge finetune`` scores it."""

    data: str | None = Field(
        None,
        description="decoders: a chat .jsonl (lmforge finetune's record formats) whose last "
        "assistant turns are answered greedily under the checkpoint's chat template and scored "
        "by exact match, before and after; null = bits-per-byte only",
    )
    n: int = Field(60, gt=0, description="records scored (the first n of data)")
    score: Literal["exact", "final_number"] = Field(
        "exact", description="exact: the whole answer, stripped; final_number: as GSM8K"
    )
    max_new_tokens: int = Field(16, gt=0, description="tokens generated per answer")


def exact_match(
    model: nn.Module, tokenizer: Tokenizer, manifest: Manifest, em: ExactMatchConfig
) -> dict[str, float]:
    """``exact_match`` (and ``em/<family>`` when records name one) of a chat decoder on the
    first ``em.n`` records of ``em.data`` — the function ``lmforge finetune`` reports with."""
    from lmforge.config import package_path
    from lmforge.data.chat_template import ChatFormat
    from lmforge.data.conversations import read_conversations
    from lmforge.eval.generation import exact_match_eval, qa_pairs
    from lmforge.eval.metrics import final_number_match, stripped_match

    assert em.data is not None
    convs, _ = read_conversations(package_path(em.data), "auto", "fail")
    if not convs:
        raise ConfigError(f"exact_match.data: {em.data} holds no records")
    fmt = ChatFormat.for_checkpoint(manifest.path or ".", tokenizer)
    match = final_number_match if em.score == "final_number" else stripped_match
    out, _ = exact_match_eval(model, fmt, qa_pairs(convs[: em.n]), em.max_new_tokens, match)
    return {"exact_match": out["exact_match"]}


def quality(
    model: nn.Module,
    tokenizer: Tokenizer,
    manifest: Manifest,
    data: str,
    max_bytes: int,
    em: ExactMatchConfig | None = None,
) -> dict[str, float]:
    """The quality metrics of ``model`` (decoder: on the held-out tail of the text file
    ``data``, plus exact match on ``em.data`` if given; sequence classifier: on the labelled
    file ``data``)."""
    if manifest.kind != "decoder":
        if em is not None and em.data:
            raise ConfigError(
                f"exact_match.data: {manifest.path} is a {manifest.kind}; exact match scores "
                "chat decoders (a classifier reports accuracy and macro-F1 on --data)"
            )
        return classifier_quality(model, tokenizer, manifest, data)
    out = lm_quality(model, tokenizer, held_out(read_text(data), max_bytes))
    if em is not None and em.data:
        out |= exact_match(model, tokenizer, manifest, em)
    return out


def default_data(manifest: Manifest) -> str:
    """The shipped evaluation file for ``manifest``'s kind."""
    return str(SHIPPED_TEXT if manifest.kind == "decoder" else SHIPPED_LABELLED)


def weights_bytes(folder: Path) -> int:
    return (Path(folder) / "model.safetensors").stat().st_size


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding once), quantized ones by their element count."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """{metric: {"before", "after", "delta"}} for the metrics both have."""
    return {
        k: {"before": before[k], "after": after[k], "delta": after[k] - before[k]}
        for k in before
        if k in after
    }
