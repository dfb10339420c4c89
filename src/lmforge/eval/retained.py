"""Retained-task metrics: what a fine-tune must keep, scored before, during and after.

Retained   the retained data of ``finetune --retain.path``: a text corpus (metric:
           bits-per-byte) or an earlier task's SFT file (metric: exact match)
forgetting the retained metric's change (after − before) in its own units, signed so that a
           positive number means forgotten: bits-per-byte up = forgot; exact match down = forgot

The penalties that prevent forgetting (EWC, L2-SP) are training: ``train/regularizers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.config import package_path
from lmforge.data.chat_template import ChatFormat, Message
from lmforge.data.conversations import read_conversations
from lmforge.eval.generation import QA, exact_match_eval, qa_pairs
from lmforge.eval.lm import lm_metrics, stream_loss_sum


@dataclass
class Retained:
    """Data whose skill the fine-tune must keep: text (bpb) or tasks (exact match)."""

    kind: str  # "text" or "sft"
    tokens: np.ndarray | None = None  # text: the token stream
    n_bytes: int = 0
    pairs: list[QA] = field(default_factory=list)  # sft: held-out questions
    convs: list[list[Message]] = field(default_factory=list)  # sft: for replay and Fisher

    @classmethod
    def load(
        cls, path: str | Path, fmt: ChatFormat, n_eval: int, max_chars: int = 200_000
    ) -> Retained:
        """A ``.txt`` file is a text corpus (its first ``max_chars`` characters); a
        ``.json``/``.jsonl`` file is an SFT file (the first ``n_eval`` records are scored)."""
        path = package_path(path)
        if path.suffix in (".json", ".jsonl"):
            convs, _ = read_conversations(path, on_error="skip")
            return cls("sft", pairs=qa_pairs(convs[:n_eval]), convs=convs)
        text = path.read_text(encoding="utf-8")[:max_chars]
        ids = np.asarray(fmt.tokenizer.encode(text).ids, dtype=np.int64)
        return cls("text", tokens=ids, n_bytes=len(text.encode("utf-8")))

    def metrics(
        self, model: nn.Module, fmt: ChatFormat, device: torch.device, batch_size: int = 8
    ) -> dict[str, float]:
        """``retain_bpb`` (text) or ``retain_em`` (tasks); ``batch_size`` windows or prompts."""
        if self.kind == "text":
            ctx = model.cfg.context_length
            loss, n = stream_loss_sum(model, self.tokens, ctx, batch_size, device)
            return {"retain_bpb": lm_metrics(loss, n, self.n_bytes)["val_bpb"]}
        em, _ = exact_match_eval(model, fmt, self.pairs, batch_size=batch_size)
        return {"retain_em": em["exact_match"]}


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Change of the retained metric, signed so that a positive number means forgotten."""
    if "retain_bpb" in before:
        return {"forgetting_bpb": after["retain_bpb"] - before["retain_bpb"]}
    return {"forgetting_em": before["retain_em"] - after["retain_em"]}
