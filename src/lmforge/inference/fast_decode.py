"""The engine's forward passes: a decoding step with inference weight layouts, and a prefill
that computes the logits of the last position only.

Why a second forward next to ``Decoder.forward``: at batch 1 a decoding step is a chain of
matrix-*vector* products, and MKL's fp32 GEMV on this AVX2 host reads a weight stored as
(in, out) ~1.35x faster than the (out, in) ``nn.Linear`` layout (measured, 1 thread, the 151
SmolLM2-135M matrices, median of 6 alternating rounds under load: 108 vs 154 ms; oneDNN's
prepacked linear and ``torch.mv`` were no faster than ``F.linear``). ``DecodeWeights`` holds
the matrices transposed once, with the SwiGLU gate and up projections fused into one matmul;
the checkpoint format, the parameter names and ``Decoder`` are untouched. The price is a
second copy of the matmul weights (+1x the model's bytes) for the engine's lifetime, so it is
built on the CPU only and an ``Engine(fast_decode=False)`` runs ``Decoder.forward``.

Each transposed matrix is also cut into blocks of output columns, two per torch thread, and
a step multiplies them with one ``torch.bmm``: MKL runs a matrix-vector or small-batch
product on one thread, while ``bmm`` spreads the blocks over the threads (measured, 2 threads,
the same 151 matrices with cold caches: 24–33 vs 31 ms at 1 row, 66 vs 136 ms at 8 rows).

The maths is ``Decoder.forward``'s, through the same layers (norms, ``RotaryEmbedding``,
``attend``, ``padded_attention``): only the order of float additions inside the matmuls
differs (tests/inference/test_fast_decode.py compares the logits; the engine's token
invariants run through this path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.decoder import Decoder
from lmforge.models.layers import (
    Block,
    CausalSelfAttention,
    GeluMLP,
    KVCache,
    RotaryEmbedding,
    SwiGLUMLP,
    attend,
    padded_attention,
)


@dataclass
class _Linear:
    """A linear layer for ``x @ weight_t + bias``; weight_t is stored as (blocks, in, out /
    blocks), contiguous: block j holds output columns j·out/blocks … (j+1)·out/blocks - 1.

    Several rows at once (concurrent requests) go through oneDNN's linear with the weight
    prepacked for a batch of 8, made at the first such step: MKL's products with a few rows
    run far below the CPU's peak (measured, 2 threads, SmolLM2's 151 matrices: 42 against
    59 ms at 8 rows, 94 against 218 ms at 32, 29 against 39 ms at 2; at 1 row the blocks
    stay faster, 28 against 32 ms). It costs another copy of the weights, only in engines
    that decode several rows; without oneDNN the blocks serve every row count.
    """

    weight_t: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None | bool = False  # False: not tried yet; None: unavailable

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        blocks, d_in, _ = self.weight_t.shape
        if x.numel() > d_in and self._packed() is not None:
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, d_in), self.packed, self.bias, "none", [], ""
            )
            return y.reshape(*x.shape[:-1], -1)
        rows = x.reshape(1, -1, d_in).expand(blocks, -1, -1)
        y = torch.bmm(rows, self.weight_t)  # (blocks, rows, out / blocks), one block per thread
        y = y.transpose(0, 1).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def _packed(self) -> torch.Tensor | None:
        if self.packed is False:
            self.packed = None
            if torch.backends.mkldnn.is_available() and self.weight_t.dtype == torch.float32:
                blocks, d_in, _ = self.weight_t.shape
                weight = self.weight_t.transpose(0, 1).reshape(d_in, -1).t().contiguous()
                try:
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
                except (RuntimeError, AttributeError):  # a build without this op: the blocks
                    self.packed = None
        return self.packed  # type: ignore[return-value]


def _transposed(*linears: nn.Linear, blocks: int) -> _Linear:
    """One (in, sum of outs) matrix for linears that read the same input (fused), in
    ``blocks`` blocks of output columns (fewer when they do not divide the columns evenly)."""
    w = torch.cat([lin.weight.detach() for lin in linears]).t()
    while w.size(1) % blocks:
        blocks -= 1
    w = w.reshape(w.size(0), blocks, -1).transpose(0, 1).contiguous()
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return _Linear(w, None)
    bias = torch.cat([b.detach() if b is not None else w.new_zeros(lin.out_features)
                      for b, lin in zip(biases, linears, strict=True)])  # fmt: skip
    return _Linear(w, bias)


@dataclass(frozen=True)
class _Layer:
    norm1: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    n_head: int
    n_kv_head: int
    head_dim: int
    scale: float | None
    rope: RotaryEmbedding | None
    qk_norm: bool
    qkv: _Linear
    proj: _Linear
    up: _Linear  # SwiGLU: gate and up fused, (C, 2·ff); GELU: fc
    down: _Linear
    swiglu: bool
    act: Any  # SwiGLU / GeluMLP.act; None: GELU with ``approximate``
    approximate: str


def _norm(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a direct functional call: the same kernel and arguments as its module,
    without nn.Module's call machinery (60 norms per SmolLM2 token)."""
    if type(m) is nn.RMSNorm:
        return partial(F.rms_norm, normalized_shape=m.normalized_shape, weight=m.weight, eps=m.eps)
    if type(m) is nn.LayerNorm:
        return partial(
            F.layer_norm, normalized_shape=m.normalized_shape, weight=m.weight, bias=m.bias,
            eps=m.eps,
        )  # fmt: skip
    return m


def _plain_linear(m: nn.Module) -> bool:
    # Exact type: a LoRA adapter or a quantized linear subclasses or replaces nn.Linear and
    # must keep its own forward.
    # torchao's quantized weights are tensor subclasses inside a plain nn.Linear: not ours.
    plain_weight = type(m.weight) in (torch.Tensor, nn.Parameter)
    return type(m) is nn.Linear and plain_weight and m.weight.is_floating_point()


@dataclass(frozen=True)
class DecodeWeights:
    """A ``Decoder``'s weights laid out for decoding (see the module docstring)."""

    model: Decoder
    layers: list[_Layer]
    norm_f: Callable[[torch.Tensor], torch.Tensor]
    head: _Linear

    @classmethod
    def prepare(cls, model: Decoder, blocks: int | None = None) -> DecodeWeights | None:
        """The fast layout of ``model``, or None when a module is not one this path knows
        (LoRA adapters, quantized linears, another attention) or the model is not on the
        CPU: the engine then runs ``Decoder.forward``. ``blocks``: column blocks per matrix,
        by default two per torch thread (measured, 2 threads: 4 blocks 66 ms at 8 rows against
        82 ms for 2, equal at 1 row)."""
        if model.tok_emb.weight.device.type != "cpu" or not _plain_linear(model.lm_head):
            return None
        blocks = blocks or 2 * torch.get_num_threads()
        layers = []
        with torch.no_grad():
            for block in model.blocks:
                if type(block) is not Block or type(block.attn) is not CausalSelfAttention:
                    return None
                attn, mlp = block.attn, block.mlp
                if type(mlp) is SwiGLUMLP:
                    ins = [mlp.gate, mlp.up]
                    act, approximate = mlp.act, "none"
                elif type(mlp) is GeluMLP:
                    ins = [mlp.fc]
                    act, approximate = mlp.act, mlp.approximate
                else:
                    return None
                # before any weight is touched: a quantized weight cannot even be concatenated
                if not all(_plain_linear(lin) for lin in [attn.qkv, attn.proj, *ins, mlp.proj]):
                    return None
                up = _transposed(*ins, blocks=blocks)
                layers.append(
                    _Layer(
                        _norm(block.norm1),
                        _norm(block.norm2),
                        attn.n_head,
                        attn.n_kv_head,
                        attn.head_dim,
                        attn.scale,
                        attn.rope,
                        attn.qk_norm,
                        _transposed(attn.qkv, blocks=blocks),
                        _transposed(attn.proj, blocks=blocks),
                        up,
                        _transposed(mlp.proj, blocks=blocks),
                        type(mlp) is SwiGLUMLP,
                        act,
                        approximate,
                    )  # fmt: skip
                )
            return cls(
                model, layers, _norm(model.norm_f), _transposed(model.lm_head, blocks=blocks)
            )

    def decode(
        self,
        idx: torch.Tensor,
        start_pos: int,
        caches: list[KVCache],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new token per row. idx: (B, 1) at column ``start_pos`` of ``caches``;
        ``attention_mask`` (B, start_pos + 1) bool as ``Decoder.forward``'s → logits (B, V)."""
        B = idx.size(0)
        S = start_pos + 1
        mask = at = None
        if attention_mask is not None:
            mask, positions = padded_attention(attention_mask, 1)  # (B, 1, 1, S), (B, 1)
            at = positions
        x = _embed(self.model, idx, start_pos, at)  # (B, 1, C)
        for layer, cache in zip(self.layers, caches, strict=True):
            nh, nkv, hd = layer.n_head, layer.n_kv_head, layer.head_dim
            qkv = layer.qkv(layer.norm1(x))
            # q and k side by side as (B, nh + nkv, 1, hd) — one position, so the same memory
            # as (B, 1, nh + nkv, hd): normalised and rotated in one call each, not two
            qk = qkv[..., : (nh + nkv) * hd].view(B, nh + nkv, 1, hd)
            if layer.qk_norm:
                qk = F.rms_norm(qk, (hd,))
            if layer.rope is not None:
                qk = layer.rope(qk, start_pos if at is None else at)
            q = qk[:, :nh]  # (B, nh, 1, hd)
            cache.k[:, :, start_pos:S] = qk[:, nh:]
            cache.v[:, :, start_pos:S] = qkv[..., (nh + nkv) * hd :].view(B, nkv, 1, hd)
            extra = {} if layer.scale is None else {"scale": layer.scale}
            # The query is the last position: without a mask it sees every cached key.
            y = attend(q, cache.k[:, :, :S], cache.v[:, :, :S], False, mask, **extra)
            x = x + layer.proj(y.transpose(1, 2).reshape(B, 1, nh * hd))
            h = layer.up(layer.norm2(x))
            if layer.swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = layer.act(gate) * up
            else:
                h = (
                    layer.act(h)
                    if layer.act is not None
                    else F.gelu(h, approximate=layer.approximate)
                )
            x = x + layer.down(h)
        return self.head(self.norm_f(x[:, -1]))  # (B, V)


def _embed(
    model: Decoder, idx: torch.Tensor, start_pos: int, positions: torch.Tensor | None
) -> torch.Tensor:
    """Token (+ learned position) embeddings of idx (B, T) → (B, T, C), as ``Decoder.forward``."""
    x = model.tok_emb(idx)
    if model.pos_emb is not None:
        if positions is None:
            positions = torch.arange(start_pos, start_pos + idx.size(1), device=idx.device)
        x = x + model.pos_emb(positions)
    return x


def prefill_logits(
    model: Decoder,
    idx: torch.Tensor,
    start_pos: int,
    caches: list[KVCache],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Decoder.forward(idx, start_pos, caches, attention_mask)[:, -1]`` without the output
    head at the other positions: idx (B, T) → logits (B, V). A 200-token prompt's head alone
    is 200 x 576 x 49152 multiply-adds for SmolLM2, which the engine never reads."""
    B, T = idx.shape
    model.check_length(start_pos + T)
    doc_mask = positions = None
    if attention_mask is not None:
        doc_mask, positions = padded_attention(attention_mask, T)  # (B, 1, T, S), (B, T)
    x = _embed(model, idx, start_pos, positions)
    for block, cache in zip(model.blocks, caches, strict=True):
        x = block(x, start_pos, cache, doc_mask, positions)
    return model.lm_head(model.norm_f(x[:, -1]))  # (B, V)
