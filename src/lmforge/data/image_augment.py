"""Image augmentation on batched tensors: random resized crop, horizontal flip, colour jitter,
Gaussian noise, RandAugment-style ops, MixUp / CutMix — each applied with its own probability.

Hand-written on purpose, in a few vectorised tensor ops: the well-kept libraries are not
installed beside torch 2.13 here (torchvision's PyPI builds want a newer torch; kornia 0.9.0
imports and runs beside 2.13 from its wheel, but is not in this environment and may not be
installed into it). Geometric ops share one path — a per-image affine matrix and
``F.grid_sample`` — the way kornia and torchvision's tensor backend implement them.
All randomness comes from the ``torch.Generator`` passed in, so a seed reproduces a batch.

images: (B, C, H, W) float in [0, 1]; every op keeps that range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
    randaug_n: int = Field(2, ge=1, description="RandAugment: ops drawn per image")
    randaug_magnitude: float = Field(
        5.0, ge=0, le=10, description="RandAugment magnitude on its 0..10 scale"
    )
    mix_p: float = Field(0.0, ge=0, le=1, description="MixUp or CutMix on a batch")
    mixup_alpha: float = Field(0.2, gt=0, description="MixUp: λ ~ Beta(α, α)")
    cutmix_alpha: float = Field(1.0, gt=0, description="CutMix: λ ~ Beta(α, α)")
    cutmix_share: float = Field(0.5, ge=0, le=1, description="chance a mix is CutMix, not MixUp")


def _chance(p: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p  # (n,) bool


def _uniform(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample every image through its affine map (B, 2, 3): output pixel at normalised
    (x, y) ∈ [-1, 1]² reads input at theta @ (x, y, 1). Outside the image reads 0 (black)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity(n: int) -> torch.Tensor:
    return torch.eye(2, 3).repeat(n, 1, 1)  # (n, 2, 3)


def random_resized_crop(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """A random box of ``crop_scale`` of the area and ``crop_ratio`` aspect, scaled back to size."""
    n = images.size(0)
    area = _uniform(*cfg.crop_scale, n, gen)
    log_r = _uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), n, gen)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # box side as a fraction of the image
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)  # box stays inside the image
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    return warp(images, theta)


def colour_jitter(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """Brightness (scale), contrast (blend with the image mean), saturation (blend with grey)."""
    n = images.size(0)
    b = _uniform(1 - cfg.brightness, 1 + cfg.brightness, n, gen).view(n, 1, 1, 1)
    c = _uniform(1 - cfg.contrast, 1 + cfg.contrast, n, gen).view(n, 1, 1, 1)
    x = (images * b).clamp(0, 1)
    grey = _grey(x)
    x = (grey.mean(dim=(1, 2, 3), keepdim=True) * (1 - c) + x * c).clamp(0, 1)
    if x.size(1) == 3:
        s = _uniform(1 - cfg.saturation, 1 + cfg.saturation, n, gen).view(n, 1, 1, 1)
        x = (_grey(x) * (1 - s) + x * s).clamp(0, 1)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W) luma (ITU-R 601 weights for RGB, as PIL and torchvision)."""
    if x.size(1) != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _rand_augment_one(x: torch.Tensor, op: int, m: float, sign: float) -> torch.Tensor:
    """One RandAugment op at magnitude m ∈ [0, 1] on a single image (1, C, H, W)."""
    t = _identity(1)
    if op == 0:  # rotate up to 30°
        a = math.radians(30 * m * sign)
        t[0, :, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    elif op == 1:  # shear x up to 0.3
        t[0, 0, 1] = 0.3 * m * sign
    elif op == 2:  # shear y
        t[0, 1, 0] = 0.3 * m * sign
    elif op == 3:  # translate x up to 30 % of the width (normalised coordinates span 2)
        t[0, 0, 2] = 0.6 * m * sign
    elif op == 4:  # translate y
        t[0, 1, 2] = 0.6 * m * sign
    elif op == 5:  # solarize: invert pixels above a threshold that falls with the magnitude
        return torch.where(x >= 1 - m, 1 - x, x)
    else:  # autocontrast: stretch each channel to 0..1
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    return warp(x, t)


N_RANDAUG_OPS = 7


def rand_augment(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """``randaug_n`` ops drawn uniformly per image, each at ``randaug_magnitude`` (random sign)."""
    m = cfg.randaug_magnitude / 10
    out = []
    for i in range(images.size(0)):
        x = images[i : i + 1]
        for op in torch.randint(N_RANDAUG_OPS, (cfg.randaug_n,), generator=gen).tolist():
            sign = 1.0 if bool(torch.rand(1, generator=gen) < 0.5) else -1.0
            x = _rand_augment_one(x, op, m, sign)
        out.append(x)
    return torch.cat(out)


def augment(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Each op on the images its probability picks; (B, C, H, W) in [0, 1] → same."""
    if not cfg.enabled:
        return images
    x = images.clone()
    n = x.size(0)
    ops = (
        (cfg.crop_p, random_resized_crop),
        (cfg.flip_p, lambda t, c, g: t.flip(-1)),
        (cfg.jitter_p, colour_jitter),
        (cfg.randaug_p, rand_augment),
        (cfg.noise_p, lambda t, c, g: t + c.noise_std * torch.randn(t.shape, generator=g)),
    )
    for p, op in ops:
        pick = _chance(p, n, gen)
        if pick.any():
            x[pick] = op(x[pick], cfg, gen).clamp(0, 1)
    return x


def mix(
    images: torch.Tensor, targets: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (blend two images) or CutMix (paste a box of one into another), with ``mix_p`` per
    batch; targets (B, K) class probabilities mix by the same λ (CutMix: the pasted area)."""
    if not cfg.enabled or not bool(torch.rand(1, generator=gen) < cfg.mix_p):
        return images, targets
    perm = torch.randperm(images.size(0), generator=gen)
    cutmix = bool(torch.rand(1, generator=gen) < cfg.cutmix_share)
    alpha = cfg.cutmix_alpha if cutmix else cfg.mixup_alpha
    # Beta(α, α) as X / (X + Y) of two Gamma draws: torch's Beta sampler takes no generator
    g = torch._standard_gamma(torch.full((2,), alpha), generator=gen)
    lam = float(g[0] / g.sum())
    if not cutmix:
        return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]
    H, W = images.shape[-2:]
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy = int(torch.randint(H, (1,), generator=gen))
    cx = int(torch.randint(W, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the share actually kept after clipping the box
    return out, lam * targets + (1 - lam) * targets[perm]
