"""Catastrophic forgetting: measure what a fine-tune loses, and the penalties that prevent it.

exact_match_eval   greedy answers to held-out prompts, scored by exact match (tasks)
Retained           the retained data of ``--retain``: a text corpus (metric: bits-per-byte) or an
                   earlier task's SFT file (metric: exact match); evaluated before, during, after
fisher_diagonal    EWC's diagonal Fisher information, estimated on retained batches
ewc_penalty        λ/2 · Σ F̂ᵢ (θᵢ − θ*ᵢ)²   (Kirkpatrick et al. 2017)
l2sp_penalty       λ/2 · Σ (θᵢ − θ⁰ᵢ)²       (Li et al. 2018, "L2-SP": pull to the start point)

Both penalties are closures for ``fit(regularizer=...)``, over the trainable parameters only.
Forgetting is reported as the retained metric's change (after − before) in its own units:
bits-per-byte up = forgot; exact-match down = forgot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import package_path
from lmforge.data.chat_template import ChatFormat, Message
from lmforge.data.conversations import read_conversations
from lmforge.data.instructions import exact_match
from lmforge.eval.lm import lm_metrics, stream_loss_sum
from lmforge.generate import generate_tokens
from lmforge.models.decoder import token_loss_sum


@dataclass
class QA:
    """A held-out conversation: the history up to the last answer, and that answer."""

    history: list[Message]
    answer: str
    family: str = ""


def qa_pairs(convs: list[list[Message]], families: list[str] | None = None) -> list[QA]:
    out = []
    for i, conv in enumerate(convs):
        last = max(j for j, m in enumerate(conv) if m["role"] == "assistant")
        out.append(QA(conv[:last], conv[last]["content"], families[i] if families else ""))
    return out


@torch.no_grad()
def exact_match_eval(
    model: nn.Module,
    fmt: ChatFormat,
    pairs: list[QA],
    max_new_tokens: int = 16,
    match: Callable[[str, str], bool] = exact_match,
) -> tuple[dict[str, float], list[str]]:
    """({"exact_match": share, "em/<family>": share …}, predictions), greedy, one at a time.
    ``match(prediction, answer)`` scores one answer (default: equal after stripping)."""
    was_training = model.training
    model.eval()
    preds, hits, per_family = [], [], {}
    stop = fmt.stop_ids()
    try:
        for qa in pairs:
            ids = fmt.prompt_ids(qa.history)
            ids = ids[-(model.cfg.context_length - max_new_tokens) :]
            new = list(
                generate_tokens(
                    model,
                    ids,
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                    eos_id=stop,
                    use_cache=True,
                )
            )
            pred = fmt.tokenizer.decode(new, skip_special_tokens=True)
            preds.append(pred)
            hit = match(pred, qa.answer)
            hits.append(hit)
            if qa.family:
                per_family.setdefault(qa.family, []).append(hit)
    finally:
        model.train(was_training)
    out = {"exact_match": float(np.mean(hits)) if hits else 0.0}
    out |= {f"em/{f}": float(np.mean(h)) for f, h in sorted(per_family.items())}
    return out, preds


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

    def metrics(self, model: nn.Module, fmt: ChatFormat, device: torch.device) -> dict[str, float]:
        """``retain_bpb`` (text) or ``retain_em`` (tasks)."""
        if self.kind == "text":
            ctx = model.cfg.context_length
            loss, n = stream_loss_sum(model, self.tokens, ctx, 8, device)
            return {"retain_bpb": lm_metrics(loss, n, self.n_bytes)["val_bpb"]}
        em, _ = exact_match_eval(model, fmt, self.pairs)
        return {"retain_em": em["exact_match"]}


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Change of the retained metric, signed so that a positive number means forgotten."""
    if "retain_bpb" in before:
        return {"forgetting_bpb": after["retain_bpb"] - before["retain_bpb"]}
    return {"forgetting_em": before["retain_em"] - after["retain_em"]}


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_diagonal(
    model: nn.Module, batches: list[tuple[torch.Tensor, ...]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters: the mean over the rows of
    ``batches`` of the squared gradient of each row's mean token loss, normalised to mean 1 over
    all entries so that λ means the same for any model size (plain EWC leaves F̂ unnormalised).

    Per row, not per batch: at the end of training on the retained task the batch-mean gradient
    is close to zero (the gradients of its rows cancel), so its square says little about which
    weights matter; measured on bench/forgetting.py, a batch-level F̂ let EWC lose the retained
    task even at λ = 10⁴."""
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    rows = 0
    for x, y, *extra in batches:
        for r in range(x.size(0)):
            kwargs = {k: v[r : r + 1].to(device) for k, v in extra[0].items()} if extra else {}
            model.zero_grad(set_to_none=True)
            loss, n = token_loss_sum(
                model(x[r : r + 1].to(device), **kwargs), y[r : r + 1].to(device)
            )
            if n == 0:
                continue
            (loss / n).backward()
            rows += 1
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach() ** 2
    fisher = {name: f / max(1, rows) for name, f in fisher.items()}
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
    return {n: f / mean for n, f in fisher.items()}


def ewc_penalty(
    model: nn.Module, fisher: dict[str, torch.Tensor], lam: float
) -> Callable[[], torch.Tensor]:
    """λ/2 · Σ F̂ᵢ (θᵢ − θ*ᵢ)², θ* = the weights now (before fine-tuning)."""
    params = _trainable(model)
    anchor = {n: p.detach().clone() for n, p in params.items()}

    def penalty() -> torch.Tensor:
        terms = [(fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items()]
        return 0.5 * lam * torch.stack(terms).sum()

    return penalty


def l2sp_penalty(model: nn.Module, lam: float) -> Callable[[], torch.Tensor]:
    """λ/2 · Σ (θᵢ − θ⁰ᵢ)² over the trainable parameters, θ⁰ = the weights now."""
    params = _trainable(model)
    anchor = {n: p.detach().clone() for n, p in params.items()}

    def penalty() -> torch.Tensor:
        return (
            0.5 * lam * torch.stack([((p - anchor[n]) ** 2).sum() for n, p in params.items()]).sum()
        )

    return penalty


def combine(*terms: Callable[[], torch.Tensor] | None) -> Callable[[], torch.Tensor] | None:
    live = [t for t in terms if t is not None]
    if not live:
        return None
    return lambda: torch.stack([t() for t in live]).sum()


def summary_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows for the printed table."""
    keys = [k for k in before if k in after]
    return [(k, f"{before[k]:.4f}", f"{after[k]:.4f}") for k in keys]
