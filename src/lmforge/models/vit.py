"""The Vision Transformer family (ViT, Dosovitskiy et al. 2021), with its classification head.

An image is cut into non-overlapping ``patch × patch`` squares; each square is projected to a
token (one strided convolution), a learned [CLS] token is prepended and learned positions are
added; then the shared pre-norm ``Block`` of ``models/layers.py`` — here with bidirectional
``CausalSelfAttention(causal=False)`` and BERT's exact-erf ``GeluMLP`` — runs as in GPT-2:

    x = [cls; patch_emb(image)] + pos_emb                    (B, 1 + N, C)
    x = x + attn(norm1(x)); x = x + mlp(norm2(x))          × n_layer
    logits = classifier(pool(norm(x)))                       pool: [CLS] state or patch mean

The layout is Hugging Face's ``ViTForImageClassification`` (``interop/hf_vit.py`` maps the
names), so its checkpoints load with equal logits. Pixel values come in as the caller
normalised them (``data/images.py``); the model does no preprocessing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lmforge.config import Section
from lmforge.models.layers import Block, CausalSelfAttention, GeluMLP


class ViTConfig(Section):
    """Architecture and head of a Vision Transformer image classifier."""

    image_size: int = Field(8, gt=0, description="input height = width, pixels")
    patch_size: int = Field(2, gt=0, description="side of one square patch, pixels")
    num_channels: int = Field(1, gt=0, description="colour channels (1 grey, 3 RGB)")
    n_layer: int = Field(4, gt=0, description="transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads")
    d_model: int = Field(64, gt=0, description="hidden width")
    d_ff: int | None = Field(None, gt=0, description="MLP hidden width; null = 4·d_model")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout (embeddings, attention, MLP)")
    norm_eps: float = Field(1e-12, gt=0, description="LayerNorm epsilon (HF ViT: 1e-12)")
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="classify the [CLS] state (as HF ViT) or the mean of the patch states"
    )
    num_labels: int = Field(10, gt=0, description="classes (filled from the data)")
    labels: list[str] | None = Field(
        None, description="class names, index = class id (filled from the data)"
    )

    @model_validator(mode="after")
    def _check(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size ({self.image_size}) must be divisible by "
                f"model.patch_size ({self.patch_size})"
            )
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ValueError(
                f"model.labels has {len(self.labels)} names but model.num_labels is "
                f"{self.num_labels}"
            )
        return self

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def grid(self) -> int:
        """Patches per side: the token grid is grid × grid."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2


def vit_digits() -> ViTConfig:
    """A 4-layer, 64-wide ViT for 8×8 grey digits (2×2 patches: 16 tokens + [CLS]); ~0.2M."""
    return ViTConfig()


def vit_base_16(num_labels: int = 1000) -> ViTConfig:
    """ViT-B/16 at 224×224 RGB (86M), the architecture of google/vit-base-patch16-224."""
    return ViTConfig(
        image_size=224, patch_size=16, num_channels=3, n_layer=12, n_head=12, d_model=768,
        dropout=0.0, num_labels=num_labels,
    )  # fmt: skip


class PatchEmbedding(nn.Module):
    """(B, C, H, W) → (B, N, d): one ``patch``-strided convolution = a Linear per patch."""

    def __init__(self, channels: int, patch: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, d, g, g) → (B, g·g, d)


class ViT(nn.Module):
    """Images (B, C, H, W) → hidden states (B, 1 + N, C), [CLS] first, final LayerNorm applied."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.d_model, cfg.norm_eps
        self.patch_emb = PatchEmbedding(cfg.num_channels, cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + cfg.n_patches, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                nn.LayerNorm(d, eps=eps),
                CausalSelfAttention(d, cfg.n_head, cfg.n_head, True, cfg.dropout, None, causal=False),
                nn.LayerNorm(d, eps=eps),
                GeluMLP(d, cfg.ff_width, True, cfg.dropout, approximate="none"),
            )
            for _ in range(cfg.n_layer)
        )  # fmt: skip
        self.norm = nn.LayerNorm(d, eps=eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HF ViT's init: truncated N(0, 0.02) matrices, tokens and positions; zero biases."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.trunc_normal_(p, std=0.02)
            else:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images of shape {tuple(images.shape)}; this ViT reads (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]})"
            )
        x = self.patch_emb(images)  # (B, N, C)
        cls = self.cls_token.expand(x.size(0), -1, -1)  # (B, 1, C)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_emb)  # (B, 1 + N, C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ImageClassifier(nn.Module):
    """ViT + pooling + Linear: images (B, C, H, W) → logits (B, num_labels)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, C) → (B, C): the [CLS] state, or the mean of the patch states."""
        return hidden[:, 0] if self.cfg.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.vit(images)))

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy in nats (fp32); ``fit`` normalises over the accumulated step.

        targets: (B,) class ids, or (B, K) class probabilities (MixUp/CutMix soft labels)."""
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    @property
    def label_names(self) -> list[str]:
        return self.cfg.labels or [f"class {i}" for i in range(self.cfg.num_labels)]
