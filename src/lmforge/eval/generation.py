"""Generation evaluation: greedy continuations of prompts, scored against references.

The prompt/reference file is JSONL with ``prompt`` and ``reference`` keys. Each prompt is
generated with the shared ``generate.generate_text`` (KV cache, greedy: temperature 0, so the
score is deterministic); prompts run one at a time — batching several prompts of different
lengths needs left-padding support in the decoder, which it does not have yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.data.tokenizer import eos_id, special_tokens
from lmforge.errors import DataError
from lmforge.eval.metrics import generation_metrics, sentence_scores
from lmforge.eval.report import generation_report
from lmforge.generate import SampleConfig, generate_text


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


def evaluate_generation(
    model,
    tokenizer,
    data: str | Path,
    out_dir: Path,
    max_new_tokens: int = 64,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate for every prompt, score (BLEU, chrF, ROUGE, EM, F1), write the report folder."""
    pairs = read_prompt_file(data)
    sample = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None)
    bos, eos = special_tokens(tokenizer).bos, eos_id(tokenizer)  # BOS: empty prompts only
    preds = [
        generate_text(model, tokenizer, p, sample, bos_id=bos, eos_id=eos).strip() for p, _ in pairs
    ]
    refs = [r for _, r in pairs]
    metrics = generation_metrics(preds, refs)
    per = [sentence_scores(p, r) for p, r in zip(preds, refs, strict=True)]
    generation_report(out_dir, metrics, [p for p, _ in pairs], preds, refs, per, info)
    return metrics
