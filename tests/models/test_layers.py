"""Shared layers: the CPU bf16 attention path equals SDPA; RoPE is a rotation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.layers import RotaryEmbedding, attend


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_bf16_cpu_attention_equals_sdpa(n_kv: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 16, generator=g)
    k, v = torch.randn(2, n_kv, 12, 16, generator=g), torch.randn(2, n_kv, 12, 16, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv != 4)
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=0)
    # an explicit mask (the KV-cache chunk case: 3 new queries after 9 cached keys)
    mask = torch.ones(3, 12, dtype=torch.bool).tril(diagonal=9)
    ref = F.scaled_dot_product_attention(q[:, :, 9:], k, v, attn_mask=mask, enable_gqa=n_kv != 4)
    got = attend(q[:, :, 9:].bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=False, mask=mask)
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=0)


def test_rope_preserves_norms_and_relative_positions() -> None:
    rope = RotaryEmbedding(head_dim=8, max_seq_len=32)
    x = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    rotated = rope(x, 0)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # the dot product of two rotated vectors depends only on their distance
    dots = (rotated[0, 0, :-4] * rotated[0, 0, 4:]).sum(-1)
    torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=1e-5, rtol=0)
