"""Text augmentation: EDA's four operations for classification data, NEFTune noise for SFT.

EDA (Wei & Zou 2019): synonym replacement, random insertion (of a synonym of a word already in
the sentence), random swap, random deletion, each applied to a share ``p`` of the words, making
``copies`` new examples per training example with the original label (classification) or the
original answer (SFT: only the user turns change). The synonyms come from
the model itself: whole-word tokens whose input embeddings are nearest (cosine) to the word's —
no word list to ship and no download, and a pretrained encoder (MiniLM) knows that "parcel" is
near "package". A random encoder's neighbours are noise: augment a pretrained one.

NEFTune (Jain et al. 2023): during fine-tuning, uniform noise of scale α/√(L·d) is added to
the token embeddings (L tokens, width d); nothing changes at evaluation.

Hand-written: nlpaug/textattack would pull large dependency trees (and WordNet downloads) for
four list operations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import replace

import torch
from pydantic import Field
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import Section
from lmforge.data.chat_template import Message
from lmforge.data.classification import Example


class AugmentConfig(Section):
    copies: int = Field(
        0, ge=0, le=32, description="augmented copies per training example; 0 = off"
    )
    p_synonym: float = Field(0.1, ge=0, le=1, description="share of words replaced by a synonym")
    p_insert: float = Field(0.1, ge=0, le=1, description="share of words inserted (synonyms)")
    p_swap: float = Field(0.1, ge=0, le=1, description="share of words swapped with another")
    p_delete: float = Field(0.1, ge=0, le=1, description="probability each word is deleted")
    neighbours: int = Field(5, gt=0, description="synonym candidates per word (nearest embeddings)")
    min_similarity: float = Field(
        0.4,
        ge=-1,
        le=1,
        description="cosine similarity a synonym needs (MiniLM: arrived → received 0.4+)",
    )


def embedding_synonyms(
    words: Iterable[str], tokenizer: Tokenizer, embedding: torch.Tensor, k: int, min_sim: float
) -> dict[str, list[str]]:
    """For each word that is one token of ``tokenizer`` (as a word after a space), up to ``k``
    other such words whose input embeddings (rows of ``embedding``) are nearest by cosine,
    above ``min_sim``."""

    def token_id(word: str) -> int | None:
        # WordPiece: the word itself; byte-level BPE: the space-prefixed token ("Ġword")
        enc = tokenizer.encode(" " + word, add_special_tokens=False)
        ids = [i for i, real in zip(enc.ids, enc.attention_mask, strict=True) if real]  # no pads
        return ids[0] if len(ids) == 1 else None

    found = {w: i for w in sorted({w.lower() for w in words}) if w.isalpha()
             and (i := token_id(w)) is not None}  # fmt: skip
    single = list(found)
    if len(single) < 2:
        return {}
    ids = torch.tensor([found[w] for w in single])
    vectors = nn.functional.normalize(embedding.detach().float()[ids], dim=-1)
    sim = vectors @ vectors.T
    sim.fill_diagonal_(-2.0)
    top = sim.topk(min(k, len(single) - 1), dim=-1)
    out: dict[str, list[str]] = {}
    for i, w in enumerate(single):
        near = [single[j] for s, j in zip(top.values[i].tolist(), top.indices[i].tolist(),
                                          strict=True) if s >= min_sim]  # fmt: skip
        if near:
            out[w] = near
    return out


def eda(text: str, synonyms: dict[str, list[str]], cfg: AugmentConfig, rng: random.Random) -> str:
    """One augmented version of ``text`` (whitespace words; punctuation stays on its word)."""
    words = text.split()
    if not words:
        return text
    n = len(words)

    def synonym(word: str) -> str | None:
        core = word.strip(".,!?;:\"'()")
        options = synonyms.get(core.lower())
        if not core or not options:
            return None
        new = rng.choice(options)
        return word.replace(core, new.capitalize() if core[0].isupper() else new)

    # synonym replacement: distinct positions that have a synonym
    positions = [i for i, w in enumerate(words) if synonym(w) is not None]
    rng.shuffle(positions)
    for i in positions[: max(1, round(cfg.p_synonym * n))] if cfg.p_synonym > 0 else []:
        words[i] = synonym(words[i]) or words[i]
    # random insertion of a synonym of a word already there
    for _ in range(round(cfg.p_insert * n)):
        candidates = [s for w in words if (s := synonym(w)) is not None]
        if candidates:
            words.insert(rng.randrange(len(words) + 1), rng.choice(candidates))
    for _ in range(round(cfg.p_swap * n)):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    kept = [w for w in words if rng.random() >= cfg.p_delete]
    return " ".join(kept or [rng.choice(words)])  # never an empty example


def augment_examples(
    examples: list[Example], synonyms: dict[str, list[str]], cfg: AugmentConfig, seed: int
) -> list[Example]:
    """``cfg.copies`` augmented copies of every example (label kept; pairs: both texts)."""
    rng = random.Random(seed)
    out = []
    for e in examples:
        for c in range(cfg.copies):
            pair = eda(e.text_pair, synonyms, cfg, rng) if e.text_pair else e.text_pair
            out.append(replace(e, text=eda(e.text, synonyms, cfg, rng), text_pair=pair,
                               where=f"{e.where} (augmented {c + 1})"))  # fmt: skip
    return out


def augment_conversations(
    convs: list[list[Message]], synonyms: dict[str, list[str]], cfg: AugmentConfig, seed: int
) -> list[list[Message]]:
    """``cfg.copies`` copies of every conversation with its user turns augmented; the assistant
    turns (the training targets) and the system prompt stay as they are."""
    rng = random.Random(seed)
    return [
        [{**m, "content": eda(m["content"], synonyms, cfg, rng)} if m["role"] == "user" else m
         for m in conv]
        for conv in convs
        for _ in range(cfg.copies)
    ]  # fmt: skip


def add_neftune(embedding: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune: while ``embedding`` is in training mode, add uniform noise in
    ±alpha/√(L·d) to its (B, L, d) output. Returns the hook's handle (``.remove()`` undoes it)."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not module.training or alpha <= 0:
            return out
        scale = alpha / math.sqrt(out.size(-2) * out.size(-1))
        return out + torch.empty_like(out).uniform_(-scale, scale)

    return embedding.register_forward_hook(hook)
