"""Image augmentation on batched tensors through kornia: random resized crop, horizontal flip,
colour jitter, Gaussian noise, RandAugment / TrivialAugment, CutMix — and MixUp — each applied
with its own probability.

kornia (0.8–0.9) installs beside torch 2.13 from its wheel; torchvision's PyPI builds want a
newer torch. kornia draws from torch's global generator, so ``augment`` and ``mix`` take a seed
and run inside ``torch.random.fork_rng``: a seed reproduces a batch, and the caller's RNG stream
(dropout, init) is left exactly as it was — which is what makes ``--resume`` exact.

images: (B, C, H, W) float in [0, 1]; every op keeps that range.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Literal

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment, TrivialAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
from pydantic import Field

from lmforge.config import Section


class AugmentConfig(Section):
    """What ``augment`` and ``mix`` do; every ``*_p`` is the chance per image (per batch for mix)."""

    enabled: bool = Field(True, description="false = train on the images as they are")
    crop_p: float = Field(0.5, ge=0, le=1, description="random resized crop")
    crop_scale: tuple[float, float] = Field(
        (0.7, 1.0), description="crop area as a fraction of the image (min, max)"
    )
    crop_ratio: tuple[float, float] = Field(
        (0.8, 1.25), description="crop aspect ratio w/h (min, max)"
    )
    flip_p: float = Field(
        0.0, ge=0, le=1, description="horizontal flip (0 for digits and text: a mirrored 3 is no 3)"
    )
    jitter_p: float = Field(0.5, ge=0, le=1, description="colour jitter")
    brightness: float = Field(0.3, ge=0, le=1, description="brightness factor in 1 ± this")
    contrast: float = Field(0.3, ge=0, le=1, description="contrast factor in 1 ± this")
    saturation: float = Field(0.3, ge=0, le=1, description="saturation factor in 1 ± this (RGB)")
    noise_p: float = Field(0.3, ge=0, le=1, description="additive Gaussian noise")
    noise_std: float = Field(0.05, ge=0, description="noise standard deviation (pixels in 0..1)")
    randaug_p: float = Field(0.0, ge=0, le=1, description="RandAugment-style ops")
    randaug_policy: Literal["randaugment", "trivialaugment"] = Field(
        "randaugment",
        description="randaugment: randaug_n ops at randaug_magnitude; trivialaugment: one op "
        "at a random magnitude",
    )
    randaug_n: int = Field(2, ge=1, le=14, description="RandAugment: ops drawn per batch")
    randaug_magnitude: float = Field(
        5.0, gt=0, lt=10, description="RandAugment magnitude on its 0..10 scale"
    )
    mix_p: float = Field(0.0, ge=0, le=1, description="MixUp or CutMix on a batch")
    mixup_alpha: float = Field(0.2, gt=0, description="MixUp: λ ~ Beta(α, α)")
    cutmix_alpha: float = Field(1.0, gt=0, description="CutMix: λ ~ Beta(α, α)")
    cutmix_share: float = Field(0.5, ge=0, le=1, description="chance a mix is CutMix, not MixUp")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run kornia's draws (torch's global CPU generator) from ``seed``, restoring the caller's
    generator state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@lru_cache(maxsize=8)
def _pipeline(cfg_json: str, channels: int, height: int, width: int) -> K.AugmentationSequential:
    """The per-image ops of ``cfg`` in kornia (built once per config and image shape; kornia
    modules draw fresh parameters on every call, so caching them is safe)."""
    cfg = AugmentConfig.model_validate_json(cfg_json)
    return K.AugmentationSequential(
        K.RandomResizedCrop((height, width), scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                            p=cfg.crop_p),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        # saturation needs 3 channels; hue is left out (it would recolour digits and photos alike)
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation if channels == 3 else 0.0,
                      0.0, p=cfg.jitter_p),
    )  # fmt: skip


@lru_cache(maxsize=8)
def _auto_policy(cfg_json: str, channels: int) -> RandAugment | TrivialAugment:
    """kornia's RandAugment / TrivialAugment; for grey images without the ``color`` (saturation)
    op, which needs RGB."""
    cfg = AugmentConfig.model_validate_json(cfg_json)
    policy = [p for p in default_policy if channels == 3 or p[0][0] != "color"]
    if cfg.randaug_policy == "trivialaugment":
        return TrivialAugment(policy=policy)
    # kornia's magnitude scale is (0, 30); lmforge keeps RandAugment's paper scale 0..10
    return RandAugment(n=cfg.randaug_n, m=round(3 * cfg.randaug_magnitude), policy=policy)


def augment(images: torch.Tensor, cfg: AugmentConfig, seed: int) -> torch.Tensor:
    """Each op on the images its probability picks; (B, C, H, W) in [0, 1] → same.

    Order: crop, flip, colour jitter, RandAugment, noise. kornia's RandAugment draws its ops
    once per call, so the images ``randaug_p`` picks share the ops (each has its own sign)."""
    if not cfg.enabled:
        return images
    b, c, h, w = images.shape
    key = cfg.model_dump_json()
    with seeded(seed):
        x = _pipeline(key, c, h, w)(images)
        pick = torch.rand(b) < cfg.randaug_p
        if pick.any():
            x = x.clone()
            x[pick] = _auto_policy(key, c)(x[pick]).clamp(0, 1)
        if cfg.noise_p > 0:
            x = K.RandomGaussianNoise(std=cfg.noise_std, p=cfg.noise_p)(x)
    return x.clamp(0, 1)


def mix(
    images: torch.Tensor, targets: torch.Tensor, cfg: AugmentConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (blend two images) or CutMix (paste a box of one into another), with ``mix_p`` per
    batch; targets (B, K) class probabilities mix by the same λ (CutMix: the pasted area)."""
    if not cfg.enabled or cfg.mix_p == 0:
        return images, targets
    with seeded(seed):
        if not bool(torch.rand(1) < cfg.mix_p):
            return images, targets
        if bool(torch.rand(1) < cfg.cutmix_share):
            cut = K.RandomCutMixV2(beta=cfg.cutmix_alpha, use_correct_lambda=True,
                                   data_keys=["input", "class"])  # fmt: skip
            # labels = row numbers, so the (own, partner, λ) rows kornia returns index any
            # targets, soft ones included; λ = 1 - pasted area = the share of the own image
            out, rows = cut(images, torch.arange(images.size(0)))
            partner, lam = rows[0, :, 1].long(), rows[0, :, 2:3].to(targets.dtype)  # (B,), (B, 1)
            return out, lam * targets + (1 - lam) * targets[partner]
        # MixUp by hand (two lines): kornia's RandomMixUpV2 draws λ uniformly from a range, not
        # from the MixUp paper's Beta(α, α) that ``mixup_alpha`` sets
        lam = float(torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample())
        perm = torch.randperm(images.size(0))
    return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]
