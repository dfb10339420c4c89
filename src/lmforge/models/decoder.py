"""The decoder-only language model family: GPT-2 style and Llama style in one readable file.

``arch`` picks the defaults of a family; each component (positions, norm, MLP, biases, tied
embeddings) can still be set on its own, and the resolved config always shows every choice.

    gpt2:  learned positions, LayerNorm, GELU MLP, biases, tied embeddings
    llama: RoPE, RMSNorm, SwiGLU MLP, no biases, grouped-query attention

Biases come in three independent groups, as Hugging Face checkpoints have them: ``qkv_bias``
(q/k/v projection: Qwen2, Llama ``attention_bias``), ``bias`` (attention output and LayerNorm:
Llama ``attention_bias``) and ``mlp_bias`` (Llama ``mlp_bias``); unset groups follow ``bias``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.autograd.function import once_differentiable

from lmforge.config import Section
from lmforge.models.activation_checkpointing import Checkpointing, run_block
from lmforge.models.layers import (
    Block,
    CausalSelfAttention,
    KVCache,
    RotaryEmbedding,
    make_mlp,
    make_norm,
    packed_attention,
    padded_attention,
)

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        positions="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
    ),
    "llama": dict(
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        norm_eps=1e-5,
    ),
}


class RopeScaling(Section):
    """Llama 3.1 RoPE frequency scaling (Hugging Face ``rope_scaling`` with rope_type llama3)."""

    type: Literal["llama3"] = Field("llama3", description="scaling method; only llama3 for now")
    factor: float = Field(gt=0, description="how much slower the long wavelengths turn")
    low_freq_factor: float = Field(gt=0, description="wavelengths > original/low are scaled")
    high_freq_factor: float = Field(gt=0, description="wavelengths < original/high are kept")
    original_context_length: int = Field(
        gt=0, description="context length of pre-training before the extension"
    )

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"model.rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        return self


class LayerShape(Section):
    """One block's sizes after structured pruning (``lmforge compress prune``); the head size
    stays ``d_model / n_head`` of the model config."""

    n_head: int = Field(gt=0, description="query heads of this block")
    n_kv_head: int = Field(gt=0, description="key/value heads of this block")
    d_ff: int = Field(gt=0, description="MLP hidden width of this block")


class DecoderConfig(Section):
    """Architecture of a decoder-only transformer. Sizes are counts, not bytes."""

    arch: Literal["gpt2", "llama"] = Field(
        "gpt2", description="family whose defaults fill unset fields"
    )
    vocab_size: int | None = Field(
        None, gt=0, description="vocabulary size; null = the tokenizer's"
    )
    context_length: int = Field(256, gt=0, description="maximum sequence length in tokens")
    n_layer: int = Field(4, gt=0, description="transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads")
    n_kv_head: int | None = Field(None, gt=0, description="key/value heads (GQA); null = n_head")
    d_model: int = Field(256, gt=0, description="residual stream width")
    d_ff: int | None = Field(
        None, gt=0, description="MLP hidden width; null = 4·d (gelu) or ≈8/3·d (swiglu)"
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on attention, residual and embeddings"
    )
    positions: Literal["learned", "rope"] | None = Field(None, description="position encoding")
    norm: Literal["layernorm", "rmsnorm"] | None = Field(None, description="normalisation layer")
    mlp: Literal["gelu", "swiglu"] | None = Field(None, description="MLP type")
    bias: bool | None = Field(
        None, description="biases in the attention output, LayerNorm and (by default) the MLP"
    )
    qkv_bias: bool | None = Field(
        None, description="biases on the q/k/v projection (Qwen2); null = as bias"
    )
    mlp_bias: bool | None = Field(
        None, description="biases in the MLP's linear layers (Llama mlp_bias); null = as bias"
    )
    tie_embeddings: bool | None = Field(
        None, description="share the input embedding and output head"
    )
    norm_eps: float | None = Field(None, gt=0, description="epsilon of the norm layers")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    rope_scaling: RopeScaling | None = Field(
        None, description="RoPE frequency scaling for long context (Llama 3.1); null = none"
    )
    layers: list[LayerShape] | None = Field(
        None, description="per-block sizes of a structurally pruned model; null = all blocks alike"
    )
    qk_norm: bool = Field(
        False,
        description="RMS-normalise each head's queries and keys before RoPE (no gain; "
        "modded-nanogpt's speedrun lever): steadier attention at high learning rates",
    )
    init: Literal["gpt2", "xavier", "he"] = Field(
        "gpt2",
        description="weight init: gpt2 (N(0,0.02), residual projections scaled by 1/sqrt(2L)), xavier, he",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_arch_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            arch = data.get("arch", "gpt2")
            for key, value in ARCH_DEFAULTS.get(arch, {}).items():
                if data.get(key) is None:
                    data = {**data, key: value}
            for key in ("qkv_bias", "mlp_bias"):  # resolved: the config shows the choice
                if data.get(key) is None and data.get("bias") is not None:
                    data = {**data, key: data["bias"]}
        return data

    @model_validator(mode="after")
    def _check(self) -> DecoderConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})"
            )
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("rope needs an even head size (model.d_model / model.n_head)")
        if self.layers is not None:
            if len(self.layers) != self.n_layer:
                raise ValueError(
                    f"model.layers lists {len(self.layers)} blocks, not n_layer={self.n_layer}"
                )
            for i, shape in enumerate(self.layers):
                if shape.n_head % shape.n_kv_head:
                    raise ValueError(f"model.layers[{i}]: n_head must be divisible by n_kv_head")
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError(
                f"model.rope_scaling needs model.positions: rope (got {self.positions!r})"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # 2/3 of 4·d keeps the parameter count of a GELU MLP; round to 64
            return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        return 4 * self.d_model

    def layer_shape(self, i: int) -> LayerShape:
        """Block ``i``'s sizes: its entry in ``layers``, else the model-wide ones."""
        if self.layers is not None:
            return self.layers[i]
        return LayerShape(n_head=self.n_head, n_kv_head=self.kv_heads, d_ff=self.ff_width)


def gpt2_small() -> DecoderConfig:
    """GPT-2 124M (Radford et al. 2019)."""
    return DecoderConfig(
        arch="gpt2", vocab_size=50257, context_length=1024, n_layer=12, n_head=12, d_model=768
    )


def llama_tiny() -> DecoderConfig:
    """A small Llama-style model for tests and CPU experiments."""
    return DecoderConfig(
        arch="llama", context_length=256, n_layer=4, n_head=4, n_kv_head=2, d_model=256
    )


class Decoder(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, vocab)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "DecoderConfig.vocab_size must be set (from the tokenizer) before building"
            )
        self.cfg = cfg
        self.activation_checkpointing: Checkpointing = "none"  # training only; see run_block
        # Backward reruns the block norms instead of keeping their outputs (Block.forward); set
        # by models/lora.prepare_model: with frozen linears only the adapters need them.
        self.rebuild_norm_outputs = False
        hd = cfg.d_model // cfg.n_head
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.positions == "learned" else None
        )
        scaling = cfg.rope_scaling.model_dump(exclude={"type"}) if cfg.rope_scaling else None
        rope = (
            RotaryEmbedding(hd, cfg.context_length, cfg.rope_theta, scaling)
            if cfg.positions == "rope"
            else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        shapes = [cfg.layer_shape(i) for i in range(cfg.n_layer)]
        self.blocks = nn.ModuleList(
            Block(
                make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias),
                CausalSelfAttention(
                    cfg.d_model,
                    s.n_head,
                    s.n_kv_head,
                    cfg.bias,
                    cfg.dropout,
                    rope,
                    cfg.qkv_bias,
                    head_dim=hd,
                    qk_norm=cfg.qk_norm,
                ),
                make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias),
                make_mlp(cfg.mlp, cfg.d_model, s.d_ff, cfg.mlp_bias, cfg.dropout),
            )
            for s in shapes
        )
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise all weights as ``cfg.init`` says."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:  # biases and norm gains
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif "emb" in name:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif self.cfg.init == "xavier":
                nn.init.xavier_uniform_(p)
            elif self.cfg.init == "he":
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            else:
                # GPT-2: projections into the residual stream are scaled down so that the
                # variance of the stream does not grow with depth.
                std = residual_std if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def check_length(self, n: int) -> None:
        """A ValueError when ``n`` positions exceed the context the model was built for."""
        if n > self.cfg.context_length:
            raise ValueError(
                f"sequence of {n} tokens exceeds context_length {self.cfg.context_length}"
            )

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int = 0,
        caches: list[KVCache] | None = None,
        segments: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx: (B, T) int64 → logits (B, T, vocab). ``caches`` (one per block) enable generation.

        ``segments`` (B, T) int: the document index of each token when a row packs several
        documents (SFT packing); each attends only within its document, from position 0.
        ``attention_mask`` (B, start_pos + T) bool, False at left padding, over the cached and
        the new positions: batched generation of prompts of different lengths (each row as alone).
        """
        B, T = idx.shape
        self.check_length(start_pos + T)
        doc_mask = positions = None
        if segments is not None:
            doc_mask, positions = packed_attention(segments)  # (B, 1, T, T), (B, T)
        elif attention_mask is not None:
            doc_mask, positions = padded_attention(attention_mask, T)  # (B, 1, T, S), (B, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)
            x = x + self.pos_emb(pos if positions is None else positions)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if caches is not None:
                x = block(x, start_pos, caches[i], doc_mask, positions)
            else:
                mode = self.activation_checkpointing if self.training else "none"
                drop = self.cfg.dropout > 0
                rebuild = self.rebuild_norm_outputs and mode == "none"  # see Block.forward
                x = run_block(block, mode, x, 0, None, doc_mask, positions, rebuild, dropout=drop)
        return self.lm_head(self.norm_f(x))

    def new_kv_caches(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> list[KVCache]:
        """Empty KV caches for generation, one per block."""
        cfg, p = self.cfg, self.tok_emb.weight
        hd = cfg.d_model // cfg.n_head
        max_len = max_len or cfg.context_length
        return [
            KVCache.empty(batch, b.attn.n_kv_head, max_len, hd, p.device, dtype or p.dtype)
            for b in self.blocks
        ]

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters; ``non_embedding`` leaves out the token (and position) embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N + 12·L·T·d (Kaplan et al. 2020; PaLM).

        N counts the weights that take part in matmuls: every parameter but the embedding
        lookups — the output head counts even when tied, since it is a matmul.
        """
        cfg = self.cfg
        T = seq_len or cfg.context_length
        n_matmul = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        return 6.0 * n_matmul + 12.0 * cfg.n_layer * T * cfg.d_model


# Row chunks of the 16-bit loss. On CPU a chunk's fp32 work buffer is cache-sized (measured,
# 2048 x 8192 bf16 logits, 1 thread: 64 / 128 / 1024 rows per chunk 50 / 54 / 84 ms forward +
# backward); on GPUs a chunk is also at least 1/16 of the rows, so kernel launches stay few.
LOSS_CHUNK_BYTES = 4 * 2**20
LOSS_CHUNKS_GPU = 16


def loss_chunk_rows(rows: int, vocab: int, device_type: str = "cpu") -> int:
    """Rows per chunk of ``token_loss_sum``'s 16-bit path for (rows, vocab) logits."""
    n = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    if device_type != "cpu":
        n = max(n, -(-rows // LOSS_CHUNKS_GPU))
    return max(1, min(rows, n))


class LowPrecisionCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of 16-bit logits, computed in fp32 one chunk of rows at a time.

    ``F.cross_entropy(logits.float())`` makes an fp32 copy of the logits, saves an fp32
    log-softmax for backward and builds two fp32 (N, V) gradients before casting to 16 bit:
    about 6x the logits' own bytes at the start of backward. This keeps only what backward
    needs — the 16-bit logits (which exist anyway), the targets and an fp32 log-sum-exp per
    row — and in backward rebuilds the softmax chunk by chunk in fp32, writing the 16-bit
    gradient directly: the logits, their gradient and one fp32 chunk are live. Every sum and
    exp runs in fp32 as before; the loss agrees with the upcast path to fp32 rounding and the
    gradient to one 16-bit ulp (tests/models/test_decoder.py).

    Hand-written because no well-kept library does this for plain PyTorch on CPU and CUDA:
    Liger Kernel's fused cross-entropy is Triton (GPU only); torchtune's CEWithChunkedOutputLoss
    and LinearCrossEntropyLoss upcast one token chunk at a time and call F.cross_entropy on it,
    which saves that chunk's fp32 log-softmax unless torch.compile fuses the upcast and the loss.
    torch.compile traces this Function (dynamo inlines forward and backward). Not twice
    differentiable (``once_differentiable``; under ``create_graph=True`` the gradient comes
    back as a constant): no lmforge caller needs a second derivative of the loss.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        """logits: (N, V) bf16/fp16; targets: (N,) int → summed loss (fp32 scalar)."""
        N, V = logits.shape
        rows = loss_chunk_rows(N, V, logits.device.type)
        keep = targets != ignore_index
        safe = targets.masked_fill(~keep, 0)  # ignored rows gather column 0, then count 0
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, rows):
            x = logits[i : i + rows].float()  # (rows, V) fp32, the one work buffer
            m = x.amax(dim=-1, keepdim=True)
            m.masked_fill_(m.isinf(), 0.0)  # as torch.logsumexp: all -inf or +inf rows
            lse[i : i + rows] = x.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
            del x  # before the next chunk's buffer is allocated
        target_logit = logits.gather(1, safe[:, None]).squeeze(1).float()  # (N,)
        ctx.save_for_backward(logits, safe, keep, lse)
        return torch.where(keep, lse - target_logit, 0.0).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        """d loss / d logits = g · (softmax(logits) − one_hot(target)) on counted rows, else 0."""
        logits, safe, keep, lse = ctx.saved_tensors
        N, V = logits.shape
        rows = loss_chunk_rows(N, V, logits.device.type)
        scale = keep.float() * grad_loss  # (N,) fp32
        grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        for i in range(0, N, rows):
            s = scale[i : i + rows, None]  # (rows, 1)
            p = logits[i : i + rows].float().sub_(lse[i : i + rows, None]).exp_().mul_(s)
            p.scatter_add_(1, safe[i : i + rows, None], -s)  # minus g at the target
            grad[i : i + rows] = p  # cast to 16 bit
            del p  # before the next chunk's buffer is allocated
        return grad, None, None


def token_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy in nats (fp32) and the number of counted tokens.

    logits: (B, T, V) (or (N, V)); targets: (B, T) (or (N,)) with ``ignore_index`` for positions
    that do not count. Summing (not averaging) lets callers normalise by the true token count
    across micro-batches and ranks — see ``train.loop.normalized_loss``. bf16/fp16 logits take
    ``LowPrecisionCrossEntropy`` (fp32 maths, 16-bit memory); others ``F.cross_entropy`` in fp32.
    """
    flat = logits.reshape(-1, logits.size(-1))  # (B·T, V)
    if flat.dtype in (torch.bfloat16, torch.float16):
        loss = LowPrecisionCrossEntropy.apply(flat, targets.reshape(-1), ignore_index)
    else:
        loss = F.cross_entropy(
            flat.float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
        )
    return loss, int((targets != ignore_index).sum())
