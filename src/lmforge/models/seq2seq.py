"""The encoder-decoder family: T5 (Raffel et al. 2020) and BART (Lewis et al. 2020) styles.

Built from the shared layers — ``CausalSelfAttention`` (bidirectional in the encoder, causal in
the decoder), ``CrossAttention`` (decoder → encoder output), ``GeluMLP``/``SwiGLUMLP`` and the
norms — with what tells the two styles apart given through the constructor:

    T5    relative position bias (log buckets, one table per stack shared by its layers),
          pre-norm RMSNorm, no biases, unscaled q·k, ReLU or gated-GELU MLP, final norms
    BART  learned absolute positions (+ LayerNorm on the embeddings), post-norm LayerNorm,
          biases, GELU MLP, a logits bias

    memory = encoder(tok_emb(input_ids))                                    (B, S, C)
    logits = lm_head(decoder(tok_emb(decoder_input_ids), memory))           (B, T, V)

Generation (``generate``) keeps a self-attention KV cache per decoder layer and computes each
layer's cross-attention keys/values from the encoder output once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lmforge.config import Section
from lmforge.models.layers import (
    CausalSelfAttention,
    CrossAttention,
    GeluMLP,
    KVCache,
    SwiGLUMLP,
)

# BART's learned positions start at row 2 (fairseq reserved rows 0-1 for padding); the table
# keeps those rows so Hugging Face weights map one to one.
BART_POS_OFFSET = 2


class Seq2SeqConfig(Section):
    """Architecture of a T5- or BART-style encoder-decoder. Sizes are counts, not bytes."""

    style: Literal["t5", "bart"] = Field("t5", description="t5 or bart (see models/seq2seq.py)")
    vocab_size: int | None = Field(None, gt=0, description="vocabulary; null = the tokenizer's")
    d_model: int = Field(128, gt=0, description="hidden width")
    n_head: int = Field(4, gt=0, description="attention heads")
    head_dim: int | None = Field(None, gt=0, description="width per head; null = d_model/n_head")
    d_ff: int = Field(512, gt=0, description="MLP hidden width")
    n_encoder_layer: int = Field(2, gt=0, description="encoder blocks")
    n_decoder_layer: int = Field(2, gt=0, description="decoder blocks")
    mlp: Literal["relu", "gelu", "gated-gelu"] = Field(
        "gated-gelu", description="relu (T5 v1.0), gated-gelu (T5 v1.1, tanh GELU), gelu (BART)"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout everywhere")
    norm_eps: float = Field(1e-6, gt=0, description="norm epsilon (T5 1e-6, BART 1e-5)")
    context_length: int = Field(512, gt=0, description="bart: learned positions per stack")
    rel_buckets: int = Field(32, gt=1, description="t5: relative position buckets")
    rel_max_distance: int = Field(128, gt=1, description="t5: distance of the last bucket")
    tie_embeddings: bool = Field(True, description="lm_head shares the token embedding")
    scale_output: bool = Field(
        True, description="t5: decoder output × d_model^-0.5 before the lm head (T5 v1.0)"
    )
    scale_embedding: bool = Field(False, description="bart: token embeddings × sqrt(d_model)")
    pad_id: int = Field(0, ge=0, description="padding token id")
    decoder_start_id: int = Field(0, ge=0, description="first decoder input (T5: pad, BART: eos)")
    eos_id: int = Field(1, ge=0, description="end of sequence")

    @model_validator(mode="after")
    def _check(self) -> Seq2SeqConfig:
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head "
                f"({self.n_head}), or set model.head_dim"
            )
        return self


def t5_tiny() -> Seq2SeqConfig:
    """A 2+2-layer, 128-wide T5 v1.1-style model for tests and CPU experiments."""
    return Seq2SeqConfig(style="t5", mlp="gated-gelu", d_model=128, n_head=4, d_ff=256)


def bart_tiny() -> Seq2SeqConfig:
    """A 2+2-layer, 128-wide BART-style model for tests and CPU experiments."""
    return Seq2SeqConfig(style="bart", mlp="gelu", norm_eps=1e-5, d_ff=512, context_length=256)


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each (key − query) offset: exact for small distances, logarithmic up to
    ``max_distance``, the last bucket beyond. The encoder tells left from right (half the
    buckets each); the causal decoder only sees the past. Integer (…) → integer (…)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    # clamp: log(0) is never used (is_small) but would warn; the same floats as transformers
    large = (
        max_exact
        + (
            torch.log(relative.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class RelativePositionBias(nn.Module):
    """T5's learned scalar per (bucket, head), added to every layer's attention scores."""

    def __init__(self, n_head: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.emb = nn.Embedding(num_buckets, n_head)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """query positions (T,), key positions (S,) → bias (1, nh, T, S)."""
        relative = k_pos[None, :] - q_pos[:, None]  # (T, S)
        b = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.emb(b).permute(2, 0, 1).unsqueeze(0)


class Seq2SeqLayer(nn.Module):
    """Self-attention [→ cross-attention] → MLP, each a residual branch: T5 normalises each
    branch's input (pre-norm), BART each residual sum (post-norm)."""

    def __init__(
        self,
        self_attn: CausalSelfAttention,
        norm1: nn.Module,
        cross_attn: CrossAttention | None,
        norm_cross: nn.Module | None,
        mlp: nn.Module,
        norm2: nn.Module,
        pre_norm: bool,
    ) -> None:
        super().__init__()
        self.self_attn, self.norm1 = self_attn, norm1
        self.cross_attn, self.norm_cross = cross_attn, norm_cross
        self.mlp, self.norm2, self.pre_norm = mlp, norm2, pre_norm

    def _residual(self, x: torch.Tensor, branch, norm: nn.Module) -> torch.Tensor:
        return x + branch(norm(x)) if self.pre_norm else norm(x + branch(x))

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        cross_kv: KVCache | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self._residual(
            x, lambda h: self.self_attn(h, start_pos, cache, attn_bias=self_bias), self.norm1
        )
        if self.cross_attn is not None:
            assert cross_kv is not None and self.norm_cross is not None
            x = self._residual(
                x, lambda h: self.cross_attn(h, cross_kv, cross_mask), self.norm_cross
            )
        return self._residual(x, self.mlp, self.norm2)


def _mlp(cfg: Seq2SeqConfig, bias: bool) -> nn.Module:
    d, ff = cfg.d_model, cfg.d_ff
    if cfg.mlp == "gated-gelu":  # T5 v1.1: gelu_new, the tanh approximation
        return SwiGLUMLP(d, ff, bias, cfg.dropout, act=lambda h: F.gelu(h, approximate="tanh"))
    if cfg.mlp == "relu":
        return GeluMLP(d, ff, bias, cfg.dropout, act=F.relu)
    return GeluMLP(d, ff, bias, cfg.dropout, approximate="none")


class Stack(nn.Module):
    """The encoder (``decoder=False``) or decoder stack: positions, layers, final norm."""

    def __init__(self, cfg: Seq2SeqConfig, decoder: bool) -> None:
        super().__init__()
        t5 = cfg.style == "t5"
        d, hd, eps = cfg.d_model, cfg.head_dim, cfg.norm_eps
        self.t5, self.decoder = t5, decoder

        def norm() -> nn.Module:
            return nn.RMSNorm(d, eps=eps) if t5 else nn.LayerNorm(d, eps=eps)

        scale = 1.0 if t5 else None  # T5 folds 1/sqrt(hd) into its initialisation
        bias = not t5
        if t5:
            self.rel_bias = RelativePositionBias(
                cfg.n_head, cfg.rel_buckets, cfg.rel_max_distance, bidirectional=not decoder
            )
        else:
            self.pos_emb = nn.Embedding(cfg.context_length + BART_POS_OFFSET, d)
            self.emb_norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            Seq2SeqLayer(
                CausalSelfAttention(
                    d,
                    cfg.n_head,
                    cfg.n_head,
                    bias,
                    cfg.dropout,
                    None,
                    causal=decoder,
                    head_dim=hd,
                    scale=scale,
                ),  # fmt: skip
                norm(),
                CrossAttention(d, cfg.n_head, bias, cfg.dropout, hd, scale) if decoder else None,
                norm() if decoder else None,
                _mlp(cfg, bias),
                norm(),
                pre_norm=t5,
            )
            for _ in range(cfg.n_decoder_layer if decoder else cfg.n_encoder_layer)
        )
        self.final_norm = norm() if t5 else None
        self.drop = nn.Dropout(cfg.dropout)
        self.max_len = None if t5 else cfg.context_length

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        start_pos: int = 0,
        caches: list[KVCache] | None = None,
        cross: list[KVCache] | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: embedded tokens (B, T, C) at positions start_pos …; key_mask (B, S) bool over the
        keys (encoder: its padding; decoder: None) → (B, T, C)."""
        B, T, _ = x.shape
        end = start_pos + T
        if self.max_len is not None and end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds context_length {self.max_len}")
        q_pos = torch.arange(start_pos, end, device=x.device)
        k_pos = torch.arange(end, device=x.device)
        bias = torch.zeros(1, 1, T, end, device=x.device, dtype=x.dtype)  # (1, 1|nh, T, S)
        if self.t5:
            bias = self.rel_bias(q_pos, k_pos).to(x.dtype)
        else:
            x = self.emb_norm(x + self.pos_emb(q_pos + BART_POS_OFFSET))
        neg = torch.finfo(x.dtype).min  # as transformers: no -inf, so no NaN rows
        if self.decoder:
            bias = bias.masked_fill(k_pos[None, :] > q_pos[:, None], neg)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask[:, None, None, :], neg)  # (B, nh, T, S)
        x = self.drop(x)
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            kv = cross[i] if cross is not None else None
            x = layer(x, bias, start_pos, cache, kv, cross_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.drop(x)


class Seq2Seq(nn.Module):
    """(input_ids (B, S), decoder_input_ids (B, T)) → logits (B, T, V)."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("Seq2SeqConfig.vocab_size must be set (from the tokenizer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by both stacks
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.style == "bart":  # a buffer, as in transformers: saved, never trained
            self.register_buffer("logits_bias", torch.zeros(1, cfg.vocab_size))
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """T5: transformers' T5 initialisation (unit embeddings; each matrix ~ its fan-in, the
        1/sqrt(hd) of attention folded into q). BART: N(0, 0.02), zero biases, unit norms."""
        t5, d = self.cfg.style == "t5", self.cfg.d_model
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif not t5:
                nn.init.normal_(p, std=0.02)
            elif name == "tok_emb.weight":
                nn.init.normal_(p, std=1.0)
            elif name.endswith("qkv.weight"):
                hd = self.cfg.head_dim or d // self.cfg.n_head
                std = torch.full((p.size(0), 1), d**-0.5)
                std[: p.size(0) // 3] = (d * hd) ** -0.5  # the query rows
                with torch.no_grad():
                    p.copy_(torch.randn_like(p) * std)
            elif name.endswith(".q.weight"):
                nn.init.normal_(p, std=(d * p.size(0) // self.cfg.n_head) ** -0.5)
            else:  # every other matrix by its fan-in (k/v/o, MLP, lm_head, position bias)
                nn.init.normal_(p, std=p.size(1) ** -0.5)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)  # (B, T, C)
        return x * self.cfg.d_model**0.5 if self.cfg.scale_embedding else x

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) 1 = real → encoder output (B, S, C)."""
        return self.encoder(self.embed(input_ids), _key_mask(attention_mask))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg.style == "t5" and self.cfg.scale_output:
            h = h * self.cfg.d_model**-0.5
        out = self.lm_head(h)  # (B, T, V)
        return out + self.logits_bias if self.cfg.style == "bart" else out

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """→ logits (B, T_dec, V) for every decoder position (teacher forcing)."""
        memory = self.encode(input_ids, attention_mask)
        cross = [layer.cross_attn.memory_kv(memory) for layer in self.decoder.layers]
        h = self.decoder(
            self.embed(decoder_input_ids), None, cross=cross, cross_mask=_cross_mask(attention_mask)
        )
        return self.logits(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def _cross_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) → (B, 1, 1, S) bool: decoder queries see the encoder's real tokens only."""
    mask = _key_mask(attention_mask)
    return None if mask is None else mask[:, None, None, :]


@dataclass
class DecodeState:
    """What generation keeps between steps: per decoder layer, the self-attention KV cache
    and the cross-attention keys/values (computed once from the encoder output)."""

    caches: list[KVCache]
    cross: list[KVCache]
    cross_mask: torch.Tensor | None


@torch.no_grad()
def generate(
    model: Seq2Seq,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy decoding: (B, S) sources → (B, n ≤ max_new_tokens) generated ids (without the
    start token); rows that produced ``eos_id`` are padded with ``pad_id`` after it. Without
    the cache every step re-runs the decoder on the whole prefix (the reference for tests)."""
    cfg = model.cfg
    B = input_ids.size(0)
    memory = model.encode(input_ids, attention_mask)
    layers = model.decoder.layers
    state = DecodeState(
        [
            KVCache.empty(B, cfg.n_head, max_new_tokens, layer.self_attn.head_dim, memory.device, memory.dtype)
            for layer in layers
        ],
        [layer.cross_attn.memory_kv(memory) for layer in layers],
        _cross_mask(attention_mask),
    )  # fmt: skip
    seq = torch.full((B, 1), cfg.decoder_start_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if use_cache:
            h = model.decoder(
                model.embed(seq[:, -1:]), None, step, state.caches, state.cross, state.cross_mask
            )
        else:
            h = model.decoder(model.embed(seq), None, 0, None, state.cross, state.cross_mask)
        nxt = model.logits(h[:, -1]).argmax(dim=-1)  # (B,)
        nxt = nxt.masked_fill(done, cfg.pad_id)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == cfg.eos_id
        if bool(done.all()):
            break
    return seq[:, 1:]
