"""The encoder-decoder family: cached = uncached generation, causality, padding invariance,
T5's buckets against transformers', and the shared attention's additive mask / scale."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lmforge.models.layers import attend
from lmforge.models.seq2seq import (
    Seq2Seq,
    Seq2SeqConfig,
    bart_tiny,
    generate,
    relative_position_bucket,
)

V = 50


def _model(style: str) -> Seq2Seq:
    torch.manual_seed(0)
    base = bart_tiny() if style == "bart" else t5_small_buckets()
    cfg = base.model_copy(update=dict(vocab_size=V, d_model=32, d_ff=64, dropout=0.0))
    return Seq2Seq(cfg).eval()


def t5_small_buckets() -> Seq2SeqConfig:
    # 8 buckets up to distance 12: generation of 20 tokens reaches the logarithmic buckets
    return Seq2SeqConfig(style="t5", mlp="gated-gelu", rel_buckets=8, rel_max_distance=12)


@pytest.fixture(params=["t5", "bart"])
def model(request) -> Seq2Seq:
    return _model(request.param)


def test_cached_generation_equals_uncached(model: Seq2Seq) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, V, (3, 9), generator=g)
    mask = torch.ones_like(x)
    mask[2, 5:] = 0
    cached = generate(model, x, mask, max_new_tokens=20)
    plain = generate(model, x, mask, max_new_tokens=20, use_cache=False)
    assert cached.tolist() == plain.tolist()
    # and the logits of the last step agree, not only their argmax
    dec = torch.cat([torch.full((3, 1), model.cfg.decoder_start_id), plain[:, :-1]], dim=1)
    with torch.no_grad():
        full = model(x, dec, mask)[:, -1]
    assert full.argmax(-1).tolist() == plain[:, -1].tolist()


def test_decoder_is_causal_and_encoder_sees_everything(model: Seq2Seq) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, V, (1, 8), generator=g)
    y = torch.randint(2, V, (1, 6), generator=g)
    y2 = y.clone()
    y2[0, 4] = (y[0, 4] + 1) % V
    x2 = x.clone()
    x2[0, 7] = (x[0, 7] + 1) % V
    with torch.no_grad():
        a, b, c = model(x, y), model(x, y2), model(x2, y)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)  # the future is invisible
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert not torch.allclose(a[:, 0], c[:, 0])  # the last source token reaches position 0


def test_padding_does_not_change_a_row(model: Seq2Seq) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randint(2, V, (1, 5), generator=g)
    y = torch.randint(2, V, (1, 4), generator=g)
    padded = torch.cat([x, torch.full((1, 3), model.cfg.pad_id)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, y, mask), model(x, y), atol=1e-5, rtol=0)


def test_buckets_match_transformers() -> None:
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ref = t5.T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            got = relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(got, ref)


def test_attend_additive_mask_and_scale_match_sdpa_in_bf16() -> None:
    """The hand-written bf16 CPU path of ``attend`` adds a float (per-head) bias and uses
    ``scale`` as SDPA does."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), False, bias.bfloat16(), scale=1.0)
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="n_head"):
        Seq2SeqConfig(d_model=30, n_head=4)
    Seq2SeqConfig(d_model=30, n_head=4, head_dim=8)  # T5 v1.1: heads need not fill d_model
    with pytest.raises(ValueError, match="vocab_size"):
        Seq2Seq(Seq2SeqConfig())
