"""Text classification data: CSV / TSV / JSONL rows → label ids → padded batches for an encoder.

A row has a text column, optionally a second text (pairs: NLI, paraphrase) and a label column.
Multi-label rows hold several labels joined by ``label_separator`` (CSV/TSV) or a JSON list.
Errors name the file, line and column. Batches are padded to the longest row of the batch;
the training order is a seeded permutation per epoch, so the cursor (epoch, position) is the
whole resume state, as in ``data/loader.py``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.config import Section
from lmforge.errors import DataError

CORPORA = Path(__file__).parent / "corpora"


def default_paths() -> dict[str, Path]:
    """The shipped, generated support-ticket intent dataset (CC0; see corpora/README.md)."""
    return {s: CORPORA / f"support_tickets_{s}.csv" for s in ("train", "val", "test")}


class ClassifyDataConfig(Section):
    train: str | None = Field(
        None, description="CSV/TSV/JSONL file; null = the shipped support_tickets"
    )
    val: str | None = Field(None, description="validation file; null = a stratified split of train")
    test: str | None = Field(
        None,
        description="held-out file evaluated at the end; null = none (shipped: its test split)",
    )
    text_column: str = Field("text", description="column (key) with the text")
    text_pair_column: str | None = Field(None, description="column with a second text (pairs)")
    label_column: str = Field("label", description="column (key) with the label")
    labels: list[str] | None = Field(
        None, description="label set in id order; null = sorted labels of train"
    )
    multi_label: bool = Field(False, description="rows may hold several labels")
    label_separator: str = Field("|", description="joins labels of a multi-label CSV/TSV cell")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="val share when val is null")
    max_length: int = Field(
        64, gt=1, description="tokens per example (with [CLS]/[SEP]); longer ones are truncated"
    )


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    labels: tuple[str, ...]  # one label unless multi-label
    where: str  # "file:line", for error messages and reports


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row dict) of a .csv, .tsv or .jsonl file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    if suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            out.append((n, row))
        return out
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"{path}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    return [(reader.line_num, row) for row in reader]


def read_examples(path: str | Path, cfg: ClassifyDataConfig) -> list[Example]:
    """Every row of ``path`` as an Example; a missing column or empty cell names file:line."""
    path = Path(path)
    out = []
    for n, row in _rows(path):
        where = f"{path}:{n}"
        for col in (cfg.text_column, cfg.label_column, cfg.text_pair_column):
            if col is not None and col not in row:
                raise DataError(
                    f"{where}: column {col!r} is missing (columns: {', '.join(map(str, row))}); "
                    f"set data.text_column / data.label_column / data.text_pair_column"
                )
        text = row[cfg.text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: column {cfg.text_column!r} is empty or not text")
        pair = row[cfg.text_pair_column] if cfg.text_pair_column else None
        raw = row[cfg.label_column]
        if isinstance(raw, list):
            labels = tuple(str(x) for x in raw)
        elif cfg.multi_label and isinstance(raw, str):
            labels = tuple(x.strip() for x in raw.split(cfg.label_separator) if x.strip())
        else:
            labels = (str(raw).strip(),)
        if not cfg.multi_label and (len(labels) != 1 or not labels[0] or raw is None):
            raise DataError(
                f"{where}: column {cfg.label_column!r} must hold one label, got {raw!r}"
            )
        out.append(Example(text, pair, labels, where))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def label_set(examples: list[Example], given: list[str] | None) -> list[str]:
    """The given labels (checked against the data), or the sorted labels seen."""
    seen = sorted({lab for e in examples for lab in e.labels})
    if given is None:
        if len(seen) < 2:
            raise DataError(
                f"only one label ({seen}) in the training data; classification needs two"
            )
        return seen
    known = set(given)
    for e in examples:
        if bad := [lab for lab in e.labels if lab not in known]:
            raise DataError(f"{e.where}: label {bad[0]!r} is not in data.labels {given}")
    return list(given)


def encode_labels(examples: list[Example], labels: list[str], multi_label: bool) -> np.ndarray:
    """(N,) int64 class ids, or (N, K) float32 0/1 for multi-label; unknown labels name file:line."""
    index = {name: i for i, name in enumerate(labels)}
    for e in examples:
        if bad := [lab for lab in e.labels if lab not in index]:
            raise DataError(
                f"{e.where}: label {bad[0]!r} is not one of the training labels {labels}"
            )
    if multi_label:
        y = np.zeros((len(examples), len(labels)), dtype=np.float32)
        for i, e in enumerate(examples):
            y[i, [index[lab] for lab in e.labels]] = 1
        return y
    return np.array([index[e.labels[0]] for e in examples], dtype=np.int64)


def imbalance(y: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Count and share per class and the largest/smallest count ratio (inf if a class is absent)."""
    counts = y.sum(axis=0).astype(int) if y.ndim == 2 else np.bincount(y, minlength=len(labels))
    total = max(1, int(counts.sum()))
    smallest = int(counts.min())
    return {
        "counts": {name: int(c) for name, c in zip(labels, counts, strict=True)},
        "shares": {name: round(int(c) / total, 4) for name, c in zip(labels, counts, strict=True)},
        "max_min_ratio": float(counts.max() / smallest) if smallest else float("inf"),
    }


def class_weights(y: np.ndarray, n_labels: int) -> torch.Tensor:
    """sklearn's "balanced" weights N / (K · count_k) for single-label; for multi-label the
    positive weight negatives/positives per label (BCE ``pos_weight``). Absent classes get 1."""
    if y.ndim == 2:
        pos = y.sum(axis=0)
        w = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0)
    else:
        counts = np.bincount(y, minlength=n_labels)
        w = np.where(counts > 0, len(y) / (n_labels * np.maximum(counts, 1)), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def stratified_split(
    examples: list[Example], y: np.ndarray, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, val indices), each class split in the same proportion (sklearn).

    Multi-label rows stratify by their first label; a class with one row stays in train.
    """
    from sklearn.model_selection import train_test_split

    strata = np.array([e.labels[0] if e.labels else "" for e in examples])
    counts = Counter(strata)
    idx = np.arange(len(examples))
    alone = np.array([counts[s] < 2 for s in strata])
    tr, va = train_test_split(
        idx[~alone], test_size=val_fraction, random_state=seed, stratify=strata[~alone]
    )
    return sorted(tr.tolist() + idx[alone].tolist()), sorted(va.tolist())


def encode_texts(
    tokenizer: Tokenizer, examples: list[Example], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(token ids, token types) per example, with [CLS] … [SEP] (… [SEP]) from the tokenizer's
    post-processor, truncated to ``max_length`` (longest text first for pairs)."""
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    if examples[0].text_pair is None:
        enc = tokenizer.encode_batch([e.text for e in examples])
    else:
        enc = tokenizer.encode_batch([(e.text, e.text_pair or "") for e in examples])
    return [(e.ids, e.type_ids) for e in enc]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row: {"idx", "token_types", "attention_mask"}, each (B, T) int64."""
    T = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, tt) in enumerate(rows):
        idx[i, : len(ids)] = torch.tensor(ids)
        types[i, : len(tt)] = torch.tensor(tt)
        mask[i, : len(ids)] = 1
    return {"idx": idx, "token_types": types, "attention_mask": mask}


class ClassificationBatches:
    """Endless shuffled (inputs, labels) batches; each epoch visits every example once.

    The interface ``fit`` needs: ``next_batch()``, ``state_dict()``, ``load_state_dict()``.
    """

    def __init__(
        self,
        rows: list[tuple[list[int], list[int]]],
        y: np.ndarray,
        batch_size: int,
        seed: int,
        pad_id: int,
    ) -> None:
        assert len(rows) == len(y) and len(rows) > 0
        self.rows, self.y, self.batch_size = rows, y, min(batch_size, len(rows))
        self.seed, self.pad_id = seed, pad_id
        self.context = max(len(r[0]) for r in rows)
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.cursor + self.batch_size > len(self.rows):  # drop the ragged tail of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
        pick = self._order(self.epoch)[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return collate([self.rows[i] for i in pick], self.pad_id), torch.from_numpy(self.y[pick])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def train_wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
    """A BERT-style uncased WordPiece tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) for
    encoders trained from scratch, with BERT's single/pair post-processor."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok
