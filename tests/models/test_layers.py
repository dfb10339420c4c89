"""Shared layers: the CPU bf16 attention path equals SDPA; RoPE is a rotation; the
hand-written RoPE and RMSNorm backwards equal autograd through the plain maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.layers import RMSNorm, RMSNormFunction, RotaryEmbedding, Rotate, attend


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


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (full-width tables)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_rope_equals_transformers_formula_in_every_layout_and_its_gradient() -> None:
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16, theta=100.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=g, requires_grad=True)  # (B, nh, T, hd)
    ref = _rope_reference(x, rope.cos, rope.sin)
    got = rope(x, 0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    grad_out = torch.randn(ref.shape, generator=g)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    torch.testing.assert_close(got_grad, ref_grad, atol=1e-6, rtol=0)
    # (B, T, nh, hd) with seq_dim=1 (the fused q/k layout) gives the transposed result
    x12 = x.detach()[:, :, :12]
    bt = rope.rotate(x12.transpose(1, 2), 4, seq_dim=1)  # positions 4 … 15
    ref4 = _rope_reference(x12, rope.cos[4:], rope.sin[4:])
    torch.testing.assert_close(bt.transpose(1, 2), ref4, atol=1e-6, rtol=0)
    # positions as a (B, T) tensor (packed documents), in both layouts, grad and no grad
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4] * 2, list(range(16))])
    ref_pos = _rope_reference(x, rope.cos[pos][:, None], rope.sin[pos][:, None])
    torch.testing.assert_close(rope(x, pos), ref_pos, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(rope(x, pos), ref_pos, atol=1e-6, rtol=0)
        bt = rope.rotate(x.transpose(1, 2), pos, seq_dim=1).transpose(1, 2)
        torch.testing.assert_close(bt, ref_pos, atol=1e-6, rtol=0)


def test_rope_backward_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ang = torch.randn(5, 1, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(Rotate.apply, (x, ang.cos(), ang.sin()))


def test_rmsnorm_forward_equals_torch_and_backward_equals_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    norm, ref_norm = RMSNorm(16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        w = torch.randn(16, generator=g)
        norm.weight.copy_(w), ref_norm.weight.copy_(w)
    x = (3 * torch.randn(4, 7, 16, generator=g)).requires_grad_()
    y, ref = norm(x), ref_norm(x)
    assert torch.equal(y, ref)  # the same forward maths, bit for bit
    grad_out = torch.randn(ref.shape, generator=g)
    got = torch.autograd.grad(y, (x, norm.weight), grad_out)
    want = torch.autograd.grad(ref, (x, ref_norm.weight), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes torch's own path
        assert torch.equal(norm(x), ref)


def test_rmsnorm_backward_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
