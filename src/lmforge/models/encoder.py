"""The bidirectional encoder family (BERT, Devlin et al. 2019; MiniLM), with its task heads.

Built from the shared layers: ``CausalSelfAttention(causal=False)`` (one fused q/k/v
projection), ``GeluMLP(approximate="none")`` (BERT's exact erf GELU) and LayerNorm, arranged
post-norm as BERT is (each residual sum is normalised, not each branch input):

    x = emb_norm(tok_emb + pos_emb + type_emb)
    x = norm1(x + attn(x)); x = norm2(x + mlp(x))      × n_layer

Heads wrap the one ``Encoder`` (never a second model class): ``SequenceClassifier``
(CLS pooling through BERT's tanh pooler, or masked mean pooling; single- or multi-label),
``TokenClassifier`` and ``MaskedLMHead`` (weights tied to the token embedding, as BERT).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lmforge.config import Section
from lmforge.models.layers import CausalSelfAttention, GeluMLP


class EncoderConfig(Section):
    """Architecture of a BERT-style encoder. Sizes are counts, not bytes."""

    vocab_size: int | None = Field(
        None, gt=0, description="vocabulary size; null = the tokenizer's"
    )
    context_length: int = Field(128, gt=0, description="maximum sequence length (positions)")
    type_vocab_size: int = Field(2, gt=0, description="token types (segment A/B of a text pair)")
    n_layer: int = Field(2, gt=0, description="transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads")
    d_model: int = Field(128, gt=0, description="hidden width")
    d_ff: int | None = Field(None, gt=0, description="MLP hidden width; null = 4·d_model")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout (embeddings, attention, MLP)")
    norm_eps: float = Field(1e-12, gt=0, description="LayerNorm epsilon (BERT: 1e-12)")
    pad_id: int = Field(0, ge=0, description="padding token id")
    pooler: bool = Field(True, description="BERT's tanh pooler over the [CLS] state")

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        return self

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model


def bert_tiny() -> EncoderConfig:
    """A 2-layer, 128-wide encoder for tests and CPU experiments (as google/bert_uncased_L-2_H-128)."""
    return EncoderConfig(n_layer=2, n_head=2, d_model=128, context_length=512)


def bert_base() -> EncoderConfig:
    """BERT-base, uncased (110M)."""
    return EncoderConfig(vocab_size=30522, context_length=512, n_layer=12, n_head=12, d_model=768)


def minilm_l6() -> EncoderConfig:
    """MiniLM-L6-H384 (all-MiniLM-L6-v2's architecture, 22M)."""
    return EncoderConfig(vocab_size=30522, context_length=512, n_layer=6, n_head=12, d_model=384)


class PostNormBlock(nn.Module):
    """BERT block: each residual sum is normalised (post-LN)."""

    def __init__(
        self, attn: CausalSelfAttention, norm1: nn.Module, mlp: nn.Module, norm2: nn.Module
    ) -> None:
        super().__init__()
        self.attn, self.norm1, self.mlp, self.norm2 = attn, norm1, mlp, norm2

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, key_mask=key_mask))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    """Token ids (B, T) [+ token types (B, T), padding mask (B, T)] → hidden states (B, T, C)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "EncoderConfig.vocab_size must be set (from the tokenizer) before building"
            )
        self.cfg = cfg
        d, eps = cfg.d_model, cfg.norm_eps
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.context_length, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(
                CausalSelfAttention(
                    d, cfg.n_head, cfg.n_head, True, cfg.dropout, None, causal=False
                ),
                nn.LayerNorm(d, eps=eps),
                GeluMLP(d, cfg.ff_width, True, cfg.dropout, approximate="none"),
                nn.LayerNorm(d, eps=eps),
            )
            for _ in range(cfg.n_layer)
        )
        self.pooler = nn.Linear(d, d) if cfg.pooler else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: N(0, 0.02) matrices and embeddings, zero biases, unit LayerNorm gains."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)

    def forward(
        self,
        idx: torch.Tensor,
        token_types: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx, token_types: (B, T) int64; attention_mask: (B, T), 1 = real token → (B, T, C)."""
        B, T = idx.shape
        if T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {T} tokens exceeds context_length {self.cfg.context_length}"
            )
        if token_types is None:
            token_types = torch.zeros_like(idx)
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos) + self.type_emb(token_types)  # (B, T, C)
        x = self.drop(self.emb_norm(x))
        key_mask = attention_mask.bool() if attention_mask is not None else None
        # No padding: the unmasked SDPA path is faster. An exported graph (ONNX) keeps the
        # mask: the test is data-dependent, and the masked path is exact for every mask.
        if key_mask is not None and not torch.compiler.is_exporting() and bool(key_mask.all()):
            key_mask = None
        for block in self.blocks:
            x = block(x, key_mask)
        return x

    def pool(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        how: Literal["cls", "mean"],
    ) -> torch.Tensor:
        """hidden (B, T, C) → (B, C): the [CLS] state (through the tanh pooler when present), or the
        mean over real tokens (sentence-transformers' pooling)."""
        if how == "cls":
            first = hidden[:, 0]
            return torch.tanh(self.pooler(first)) if self.pooler is not None else first
        return mean_pool(hidden, attention_mask)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the real tokens' states: hidden (B, T, C), mask (B, T) → (B, C)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class HeadConfig(Section):
    """What the encoder is fine-tuned to predict."""

    task: Literal["sequence", "multilabel", "token"] = Field(
        "sequence",
        description="sequence: one label per text; multilabel: any subset of labels; token: one label per token",
    )
    num_labels: int = Field(2, gt=0, description="classes (filled from the data)")
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="sequence tasks: [CLS] through the pooler, or masked mean"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout before the classifier")


class SequenceClassifier(nn.Module):
    """Encoder + pooling + Linear: (B, T) → logits (B, num_labels).

    As ``BertForSequenceClassification``: single-label trains with softmax cross-entropy,
    multi-label with one sigmoid (binary cross-entropy) per label.
    """

    def __init__(self, encoder: Encoder, head: HeadConfig) -> None:
        super().__init__()
        assert head.task in ("sequence", "multilabel")
        self.encoder, self.head_cfg = encoder, head
        self.drop = nn.Dropout(head.dropout)
        self.classifier = nn.Linear(encoder.cfg.d_model, head.num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        idx: torch.Tensor,
        token_types: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.encoder(idx, token_types, attention_mask)  # (B, T, C)
        pooled = self.encoder.pool(hidden, attention_mask, self.head_cfg.pooling)  # (B, C)
        return self.classifier(self.drop(pooled))

    def loss_sum(
        self, logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed loss in nats (fp32). labels: (B,) class ids, or (B, L) 0/1 for multi-label.

        Summed, not averaged, so ``fit`` normalises over a whole accumulated step; with class
        weights the sum weights each example by its class weight (as sklearn's sample weights).
        """
        if self.head_cfg.task == "multilabel":
            return F.binary_cross_entropy_with_logits(
                logits.float(), labels.float(), pos_weight=class_weights, reduction="sum"
            )
        return F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="sum")


class TokenClassifier(nn.Module):
    """Encoder + Linear per token: (B, T) → logits (B, T, num_labels) (NER, POS tagging)."""

    def __init__(self, encoder: Encoder, head: HeadConfig) -> None:
        super().__init__()
        self.encoder, self.head_cfg = encoder, head
        self.drop = nn.Dropout(head.dropout)
        self.classifier = nn.Linear(encoder.cfg.d_model, head.num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        idx: torch.Tensor,
        token_types: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.classifier(self.drop(self.encoder(idx, token_types, attention_mask)))

    def loss_sum(
        self, logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """labels: (B, T) with -100 on padding and sub-word continuations."""
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), weight=class_weights, reduction="sum"
        )


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense → GELU → LayerNorm → vocabulary (tied to the token embedding)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        d = encoder.cfg.d_model
        self.encoder = encoder
        self.dense = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=encoder.cfg.norm_eps)
        self.decoder = nn.Linear(d, encoder.cfg.vocab_size)
        self.decoder.weight = encoder.tok_emb.weight

    def forward(
        self,
        idx: torch.Tensor,
        token_types: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """→ logits (B, T, vocab); train with cross-entropy on the masked positions only."""
        h = self.encoder(idx, token_types, attention_mask)
        return self.decoder(self.norm(F.gelu(self.dense(h))))


def build_task_model(cfg: EncoderConfig, head: HeadConfig) -> SequenceClassifier | TokenClassifier:
    """The encoder with the head ``head.task`` names."""
    encoder = Encoder(cfg)
    if head.task == "token":
        return TokenClassifier(encoder, head)
    return SequenceClassifier(encoder, head)
