"""Generation-based evaluation: greedy answers to prompts, scored against references.

evaluate_generation  a JSONL of ``prompt``/``reference`` rows → BLEU, chrF, ROUGE, EM, F1 and
                     the report folder (``lmforge eval --data prompts.jsonl``)
QA, qa_pairs         held-out chat conversations: the history up to the last answer + that answer
exact_match_eval     greedy answers to held-out chat prompts, scored by a match function
                     (``finetune``'s suite, GSM8K's final number, retained tasks)

Every prompt is generated greedily (deterministic score) by ``generate.generate_batch``:
``batch_size`` prompts per forward, left-padded, each row's tokens equal to the prompt run
alone. On a CPU a decoding step of one row is bound by reading the weights, so a batch of 8
costs little more than one row (measured on SmolLM2-135M GSM8K: docs/finetune.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.chat_template import ChatFormat, Message
from lmforge.data.tokenizer import eos_id, special_tokens
from lmforge.errors import DataError
from lmforge.eval.metrics import generation_metrics, sentence_scores, stripped_match
from lmforge.eval.report import generation_report
from lmforge.generate import StreamDecoder, generate_batch


def read_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, reference) pairs; errors name file:line and the missing key."""
    path, out = Path(path), []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        for key in ("prompt", "reference"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise DataError(f"{path}:{n}: key {key!r} (a string) is missing")
        out.append((row["prompt"], row["reference"]))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def is_prompt_file(path: str | Path) -> bool:
    """A .jsonl whose first row has ``prompt`` and ``reference``."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and {"prompt", "reference"} <= row.keys()


def continuation_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], new: Sequence[int]) -> str:
    """The text of ``new`` as ``generate.generate_text`` returns it (decoded after the prompt,
    so decoders that strip a leading space stay right)."""
    stream = StreamDecoder(tokenizer, context_ids=prompt_ids)
    return "".join([stream.push(t) for t in new] + [stream.flush()])


def evaluate_generation(
    model: nn.Module,
    tokenizer: Tokenizer,
    data: str | Path,
    out_dir: Path,
    max_new_tokens: int = 64,
    info: dict[str, Any] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generate for every prompt, score (BLEU, chrF, ROUGE, EM, F1), write the report folder.

    Prompts are encoded as ``generate_text`` encodes them (an empty one starts from BOS) and
    generation stops at EOS."""
    pairs = read_prompt_file(data)
    bos = special_tokens(tokenizer).bos  # needed only for an empty prompt
    prompts = []
    for n, (p, _) in enumerate(pairs, 1):
        ids = tokenizer.encode(p).ids if p else [bos] if bos is not None else []
        if not ids:
            raise DataError(f"{data}: row {n}: empty prompt and the tokenizer has no BOS token")
        prompts.append(ids)
    new = generate_batch(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id(tokenizer),
                         batch_size=batch_size)  # fmt: skip
    preds = [continuation_text(tokenizer, p, t).strip() for p, t in zip(prompts, new, strict=True)]
    refs = [r for _, r in pairs]
    metrics = generation_metrics(preds, refs)
    per = [sentence_scores(p, r) for p, r in zip(preds, refs, strict=True)]
    generation_report(out_dir, metrics, [p for p, _ in pairs], preds, refs, per, info)
    return metrics


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


def exact_match_eval(
    model: nn.Module,
    fmt: ChatFormat,
    pairs: list[QA],
    max_new_tokens: int = 16,
    match: Callable[[str, str], bool] = stripped_match,
    batch_size: int = 8,
) -> tuple[dict[str, float], list[str]]:
    """({"exact_match": share, "em/<family>": share …}, predictions), greedy, ``batch_size``
    prompts at a time. ``match(prediction, answer)`` scores one answer (default: equal after
    stripping; ``eval.metrics.final_number_match`` for GSM8K). A prompt keeps its last
    context − ``max_new_tokens`` tokens, so the answer always fits."""
    keep = model.cfg.context_length - max_new_tokens
    prompts = [fmt.prompt_ids(qa.history)[-keep:] for qa in pairs]
    new = generate_batch(model, prompts, max_new_tokens=max_new_tokens, eos_id=fmt.stop_ids(),
                         batch_size=batch_size)  # fmt: skip
    preds = [fmt.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    hits, per_family = [], {}
    for qa, pred in zip(pairs, preds, strict=True):
        hits.append(match(pred, qa.answer))
        if qa.family:
            per_family.setdefault(qa.family, []).append(hits[-1])
    out = {"exact_match": float(np.mean(hits)) if hits else 0.0}
    out |= {f"em/{f}": float(np.mean(h)) for f, h in sorted(per_family.items())}
    return out, preds
