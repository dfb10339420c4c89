"""Small building blocks shared by every model family: norms, rotary positions, attention, MLPs.

Each layer receives its sizes through the constructor and reads no global config, so a model
file composes them explicitly (torchtune style) and tests can build one layer alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.activation_checkpointing import rebuilt_in_backward


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """``layernorm`` (GPT-2, optional bias) or ``rmsnorm`` (Llama, never a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


def llama3_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_context_length: int,
) -> torch.Tensor:
    """Llama 3.1 RoPE frequency scaling, as transformers' ``_compute_llama3_parameters``.

    inv_freq: (hd/2,) radians per position → (hd/2,) scaled. Wavelengths shorter than
    ``original_context_length / high_freq_factor`` are kept (local order), those longer than
    ``original_context_length / low_freq_factor`` are slowed down by ``factor`` (to reach a longer
    context), and the band in between is interpolated smoothly.
    """
    low_freq_wavelen = original_context_length / low_freq_factor
    high_freq_wavelen = original_context_length / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context_length / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) in the "rotate half" layout.

    The rotate-half layout is the one Hugging Face's Llama uses, so converted weights need
    no permutation of the query/key rows. ``llama3_scaling`` (the keyword arguments of
    ``llama3_inv_freq`` after ``inv_freq``) rescales the frequencies as Llama 3.1 does.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float = 10000.0,
        llama3_scaling: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.llama3_scaling = llama3_scaling
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables, e.g. after the model was built on the meta device."""
        hd = self.head_dim
        # int64 arange cast to float, exactly as transformers computes it, for bitwise-equal tables
        exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
        inv_freq = 1.0 / self.theta**exponent  # (hd/2,)
        if self.llama3_scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, **self.llama3_scaling)
        t = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
        # Buffers are not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """x: (B, nh, T, hd) → same shape, rotated by positions start_pos … start_pos+T-1,
        or by ``start_pos`` given as a (B, T) tensor of positions (packed documents restart at 0)."""
        T = x.size(-2)
        if isinstance(start_pos, torch.Tensor):
            cos = self.cos[start_pos].unsqueeze(1).to(x.dtype)  # (B, 1, T, hd)
            sin = self.sin[start_pos].unsqueeze(1).to(x.dtype)
        else:
            cos = self.cos[start_pos : start_pos + T].to(x.dtype)
            sin = self.sin[start_pos : start_pos + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos + rotated * sin


@dataclass
class KVCache:
    """Keys and values of one attention layer for generation. k, v: (B, n_kv_head, T_max, hd)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(
        cls, batch: int, n_kv_head: int, max_len: int, head_dim: int, device, dtype
    ) -> KVCache:
        shape = (batch, n_kv_head, max_len, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (n_kv_head ≤ n_head).

    One fused projection computes q, k and v (one matmul instead of three: faster on CPU and
    the layout GPT-2 checkpoints use); ``n_kv_head < n_head`` gives GQA (Llama 2 70B, Llama 3),
    ``n_kv_head == 1`` multi-query attention.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        bias: bool,
        dropout: float,
        rope: RotaryEmbedding | None,
        qkv_bias: bool | None = None,
        causal: bool = True,
        head_dim: int | None = None,
        scale: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        assert n_head % n_kv_head == 0 and (head_dim is not None or d_model % n_head == 0)
        self.n_head, self.n_kv_head = n_head, n_kv_head
        # T5 v1.1 heads are narrower than d_model / n_head (6 x 64 < 512)
        self.head_dim = head_dim or d_model // n_head
        self.scale = scale  # None: 1/sqrt(head_dim); T5 uses 1 (folded into its init)
        # Qwen2 has biases on q/k/v only: ``qkv_bias`` overrides ``bias`` for this projection.
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        self.rope = rope
        self.causal = causal  # False: bidirectional (BERT-style encoders)
        self.qk_norm = qk_norm  # RMS-normalised q and k per head, no gain (DecoderConfig.qk_norm)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        doc_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) → (B, T, C). With ``cache``, x holds positions start_pos … start_pos+T-1.

        ``attn_bias`` (B|1, nh|1, T, S) float is added to the scores and replaces every other
        mask (it must carry causality and padding itself): T5's relative position bias.

        ``key_mask`` (B, T) bool, True for real tokens, hides padding keys (non-causal only).
        ``doc_mask`` (B, 1, T, S) bool and ``positions`` (B, T) come from ``packed_attention``
        (S = T: packed documents attend only to themselves and their positions restart at 0) or
        from ``padded_attention`` (S = start_pos + T, with or without the cache: left-padded
        rows of a generation batch never attend to their padding).
        """
        B, T, C = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split(
            [self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1
        )
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
        # A copy, not a view: attention saves v for backward, and a view would keep the whole
        # fused qkv output alive (measured: +6 MiB per layer at 8 x 256 x 1024, fp32).
        v = v.reshape(B, T, self.n_kv_head, hd).transpose(1, 2).contiguous()
        if self.qk_norm:
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
        if self.rope is not None:
            at = start_pos if positions is None else positions
            q, k = self.rope(q, at), self.rope(k, at)

        mask, is_causal = None, self.causal
        if key_mask is not None:
            assert not self.causal and cache is None, "key_mask is for bidirectional attention"
            mask = key_mask[:, None, None, :]  # (B, 1, 1, S): every query sees the real keys
        if doc_mask is not None:
            mask, is_causal = doc_mask, False  # (B, 1, T, S): already causal
        if attn_bias is not None:
            mask, is_causal = attn_bias, False
        if cache is not None:
            end = start_pos + T
            cache.k[:, :, start_pos:end] = k
            cache.v[:, :, start_pos:end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
            if start_pos > 0 and doc_mask is None and attn_bias is None:
                # Query i (absolute position start_pos+i) may see keys 0 … start_pos+i.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(
                        diagonal=start_pos
                    )
        dropout = self.dropout if self.training else 0.0
        # scale only when set: diagnose/explain.py records attention through attend's old
        # signature (every module except T5's uses the default 1/sqrt(hd))
        extra = {} if self.scale is None else {"scale": self.scale}
        y = attend(q, k, v, is_causal, mask, dropout, **extra)  # (B, nh, T, hd)
        # -1, not C: under tensor parallelism this rank holds only n_head / tp of the heads
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_drop(self.proj(y))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, nh, T, hd); k, v: (B, nkv, S, hd) → (B, nh, T, hd).

    ``mask`` (T, S), or (B, 1, 1, S) for padding, is True where a query may attend; a float
    mask (broadcasting to (B, nh, T, S)) is added to the scores instead.
    ``is_causal`` needs T == S; ``scale`` multiplies q·k (None: 1/sqrt(hd)).
    ``F.scaled_dot_product_attention`` everywhere except bfloat16 on the CPU: there PyTorch's
    fused CPU kernel is 2-3x slower than plain matmul → softmax → matmul (torch 2.13, 2 cores,
    forward + backward, B=8 nh=6 T=256 hd=64: 32 ms vs 19 ms; fp32 SDPA is the faster one).
    The softmax accumulates in fp32 either way.
    """
    B, nh, T, hd = q.shape
    nkv, S = k.size(1), k.size(2)
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=nkv != nh,
        )
    q = q.view(B, nkv, nh // nkv, T, hd)  # query heads grouped by the kv head they share
    att = (q @ k.unsqueeze(2).transpose(-1, -2)) * (hd**-0.5 if scale is None else scale)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        if mask.dim() == 4:  # (B, 1, 1|T, S) → (B, 1, 1, 1|T, S) to broadcast over the groups
            mask = mask.unsqueeze(2) if mask.size(1) == 1 else mask.unflatten(1, (nkv, -1))
        if mask.dtype == torch.bool:
            att = att.masked_fill(~mask, float("-inf"))
        else:
            att = att + mask
    # bf16 in and out: the CPU kernel accumulates in fp32 inside; an fp32 output would be
    # saved for backward (2x the bytes) and measured 1.9x slower (40.8 vs 21.8 ms per layer).
    att = att.softmax(dim=-1)
    if dropout > 0:
        att = F.dropout(att, dropout)
    return (att @ v.unsqueeze(2)).view(B, nh, T, hd)  # (B, nkv, g, T, hd) → (B, nh, T, hd)


class CrossAttention(nn.Module):
    """Multi-head attention from x to another sequence (encoder-decoder models).

    Queries come from x, keys and values from ``memory`` (the encoder's output) through one
    fused k/v projection; ``memory_kv`` computes those once, so generation reuses them for
    every new token instead of recomputing them per step.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        bias: bool,
        dropout: float,
        head_dim: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim or d_model // n_head
        inner = n_head * self.head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.kv = nn.Linear(d_model, 2 * inner, bias=bias)
        self.proj = nn.Linear(inner, d_model, bias=bias)
        self.dropout, self.scale = dropout, scale
        self.resid_drop = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> KVCache:
        """memory (B, S, C) → keys and values (B, nh, S, hd) each."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return KVCache(k, v)

    def forward(
        self, x: torch.Tensor, kv: KVCache, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, C), ``kv`` from ``memory_kv``, mask (B, 1, 1, S) bool or additive → (B, T, C)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        dropout = self.dropout if self.training else 0.0
        extra = {} if self.scale is None else {"scale": self.scale}  # as CausalSelfAttention
        y = attend(q, kv.k, kv.v, False, mask, dropout, **extra)  # (B, nh, T, hd)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


class GeluMLP(nn.Module):
    """GPT-2 MLP: Linear → GELU (tanh approximation, as GPT-2 was trained) → Linear.

    ``approximate="none"`` is the exact erf GELU that BERT was trained with; ``act`` replaces
    the GELU (T5 v1.0's ReLU).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        bias: bool,
        dropout: float,
        approximate: str = "tanh",
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.approximate, self.act = approximate, act
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = self.act(h) if self.act is not None else F.gelu(h, approximate=self.approximate)
        return self.drop(self.proj(h))


class SwiGLUMLP(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020); ``act`` replaces the SiLU
    (T5 v1.1's gated GELU)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        bias: bool,
        dropout: float,
        act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.act = act
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate(x), self.up(x)
        # A LoRA-adapted down projection (models/fused_lora.py) forms silu(gate) * up itself
        # and saves only gate and up for backward, not the two (N, d_ff) products as well.
        gated = getattr(self.proj, "gated_forward", None)
        if gated is not None and self.act is F.silu:
            return self.drop(gated(gate, up))
        return self.drop(self.proj(self.act(gate) * up))


def make_mlp(kind: str, d_model: int, d_ff: int, bias: bool, dropout: float) -> nn.Module:
    if kind == "gelu":
        return GeluMLP(d_model, d_ff, bias, dropout)
    if kind == "swiglu":
        return SwiGLUMLP(d_model, d_ff, bias, dropout)
    raise ValueError(f"unknown mlp {kind!r}")


class Block(nn.Module):
    """Pre-norm transformer block: two residual branches."""

    def __init__(
        self, norm1: nn.Module, attn: CausalSelfAttention, norm2: nn.Module, mlp: nn.Module
    ) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        doc_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        rebuild_norms: bool = False,
    ) -> torch.Tensor:
        """``rebuild_norms``: backward reruns the two norms instead of keeping their outputs
        (``rebuilt_in_backward``): the Decoder asks for it in LoRA training, where those
        outputs are saved only as the adapters' inputs (8 bytes per token and width, fp32)."""
        h = self.norm1(x)
        with self._norm_rebuilt(rebuild_norms, h, self.norm1, x):
            a = self.attn(h, start_pos, cache, doc_mask=doc_mask, positions=positions)
        x = x + a
        h = self.norm2(x)
        with self._norm_rebuilt(rebuild_norms, h, self.norm2, x):
            m = self.mlp(h)
        return x + m

    @staticmethod
    def _norm_rebuilt(
        rebuild: bool, h: torch.Tensor, norm: nn.Module, x: torch.Tensor
    ) -> contextlib.AbstractContextManager:
        if not rebuild or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        if torch.is_autocast_enabled(x.device.type):  # the adapters save cast copies, not h
            return contextlib.nullcontext()
        return rebuilt_in_backward(h, lambda: norm(x))


def packed_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and positions for rows that pack several documents.

    segments: (B, T) int, the document index of every token; a document's tokens are
    contiguous. Returns ``doc_mask`` (B, 1, T, T) bool — query t sees key s iff s <= t and both
    belong to the same document (a block-diagonal causal mask) — and ``positions`` (B, T),
    each token's offset from the start of its document, so a packed document is computed
    exactly as it would be alone.
    """
    B, T = segments.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    idx = torch.arange(T, device=segments.device).expand(B, T)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]  # a document starts here
    starts = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return (same & causal)[:, None], idx - starts


def padded_attention(attention_mask: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and positions for the last ``T`` tokens of left-padded rows.

    attention_mask: (B, S) bool, True for real tokens, over every position so far (the cached
    ones and the ``T`` new ones). Returns ``doc_mask`` (B, 1, T, S) — query t (absolute slot
    S - T + t) sees key s iff s <= its slot and s is a real token — and ``positions`` (B, T),
    each token's count of real tokens before it, so a padded row is computed as it would be
    alone. A padding query also sees itself: a query with no key at all would give NaN, and
    NaN keys/values of the next layer would poison real rows (0 · NaN = NaN in ``att @ v``).
    """
    B, S = attention_mask.shape
    slot = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    key = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    mask = ((key <= slot) & attention_mask[:, None, :]) | (key == slot)  # (B, T, S)
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)[:, S - T :]  # (B, T)
    return mask[:, None], positions
