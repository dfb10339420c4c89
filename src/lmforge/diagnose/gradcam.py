"""Where a ViT looks: Grad-CAM on a chosen block and attention rollout, drawn over the image.

- Grad-CAM (Selvaraju et al. 2017), adapted to transformers as pytorch-grad-cam does for ViT:
  the "feature map" is a block's input after its first LayerNorm (``blocks[i].norm1``), one
  C-vector per patch token. Channel weights are the gradients of the target class's logit,
  averaged over the patch tokens; the map is ReLU(Σ_c weight_c · activation_c) per patch.
  Not the block's *output*: with [CLS] pooling the last block's patch outputs never reach the
  classifier (zero gradient), while its input reaches [CLS] through attention.
  ``per_token`` weights each token by its own gradient (HiResCAM, Draelos & Carin 2020) instead
  of the mean over tokens; ``lmforge explain`` draws that one: on the synthetic region test
  (tests/diagnose/test_gradcam.py) it localised the deciding region more reliably across
  training seeds, and block 0 (the patch tokens before attention mixes them) best of all.
  The last block (pytorch-grad-cam's usual ViT target) is ≈ uniform on a small ViT: its norm1
  output reaches the logit only through the [CLS] query's attention (∂y/∂z_j ∝ a_0j), which
  token-mean weights average away, and block 0 has already mixed the region's evidence into
  every token; docs/vision.md gives the derivation and the measurement.
- Attention rollout (Abnar & Zuidema 2020): each layer's head-averaged attention, with the
  residual connection added as 0.5·A + 0.5·I and rows renormalised, multiplied from the first
  layer to the last; the [CLS] row over the patches says how much each patch flowed into the
  classified token. The probabilities are recorded from the model's own attention calls
  (``diagnose/explain.recording_attention``). It is class-agnostic by construction.

Hand-written (≈ 30 lines of maths) rather than through pytorch-grad-cam/Captum's LayerGradCam:
the former is not installed here, and Captum's LayerGradCam assumes a conv layout (B, C, H, W).
Both maps are (grid, grid) per image, non-negative, normalised to sum to 1 (a distribution of
"mass" over patches, which is what the tests threshold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.data.images import digits, read_npz, to_model_input
from lmforge.diagnose.explain import recording_attention
from lmforge.errors import ConfigError
from lmforge.eval.mode import eval_mode
from lmforge.models.vit import ImageClassifier


def _as_mass(maps: torch.Tensor) -> torch.Tensor:
    """(B, N) non-negative → (B, N) summing to 1 (uniform where a map is all zero)."""
    total = maps.sum(dim=1, keepdim=True)
    uniform = torch.full_like(maps, 1.0 / maps.size(1))
    return torch.where(total > 0, maps / total.clamp(min=1e-12), uniform)


def grad_cam(
    model: ImageClassifier,
    images: torch.Tensor,
    target: torch.Tensor,
    block: int = -1,
    per_token: bool = False,
) -> torch.Tensor:
    """Grad-CAM of class ``target`` (B,) on the input of ``blocks[block]``.

    images: (B, C, H, W) model input (``to_model_input``) → (B, grid, grid), each summing to 1.
    """
    n_layer = len(model.vit.blocks)
    if not -n_layer <= block < n_layer:
        raise ConfigError(f"--block {block}: this ViT has blocks 0..{n_layer - 1} (or -1 = last)")
    saved: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
        out.retain_grad()
        saved.append(out)

    handle = model.vit.blocks[block].norm1.register_forward_hook(keep)
    try:
        with eval_mode(model), torch.enable_grad():
            x = images.detach().requires_grad_(True)  # so the graph exists even if frozen
            logits = model(x)  # (B, K)
            logits.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    acts = saved[0][:, 1:]  # (B, N, C): the patch tokens, [CLS] dropped
    grads = saved[0].grad[:, 1:]  # (B, N, C)
    # per_token: HiResCAM (Draelos & Carin 2020), each token's own gradient, not the mean
    weights = grads if per_token else grads.mean(dim=1, keepdim=True)  # (B, N|1, C)
    cam = (weights * acts).sum(dim=-1).relu().detach()  # (B, N)
    model.zero_grad(set_to_none=True)
    g = model.cfg.grid
    return _as_mass(cam).view(-1, g, g)


def attention_rollout(model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout of the [CLS] token over the patches: (B, C, H, W) → (B, grid, grid)."""
    with eval_mode(model), torch.no_grad(), recording_attention() as maps:
        model(images)
    rollout = None
    for att in maps:  # (B, nh, T, T), first layer first
        a = att.mean(dim=1)  # (B, T, T)
        a = 0.5 * a + 0.5 * torch.eye(a.size(-1))
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None, "the model recorded no attention"
    g = model.cfg.grid
    return _as_mass(rollout[:, 0, 1:]).view(-1, g, g)


def read_one_image(spec: str, model: ImageClassifier) -> np.ndarray:
    """``--image``: an image file, ``FILE.npz:INDEX`` or ``digits:INDEX`` → (C, H, W) in [0, 1],
    resized to the model's input size."""
    from lmforge.data.images import resize

    source, _, index = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if source == "digits" or source.endswith(".npz"):
        data = digits() if source == "digits" else read_npz(Path(source))
        if not index.isdigit() or int(index) >= len(data):
            raise ConfigError(
                f"--image {spec}: give {source}:INDEX with INDEX in 0..{len(data) - 1}"
            )
        image = data.images[int(index)]
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(spec) as im:
                im = im.convert("L" if model.cfg.num_channels == 1 else "RGB")
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"--image {spec}: not a readable image ({e})") from None
        image = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if image.shape[0] != model.cfg.num_channels:
        raise ConfigError(f"--image {spec}: {image.shape[0]} channels; the model reads "
                          f"{model.cfg.num_channels}")  # fmt: skip
    return resize(image[None], model.cfg.image_size)[0]


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:  # noqa: ANN001
    """image (C, H, W) in [0, 1] in grey/colour, heat (g, g) upsampled over it as a jet map."""
    shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    H, W = image.shape[-2:]
    ax.imshow(shown, cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)
    ax.imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
              interpolation="bilinear")  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def write_image_report(
    out_dir: Path,
    image: np.ndarray,
    cam: np.ndarray,
    rollout: np.ndarray,
    label: str,
    prob: float,
    block: int,
) -> Path:
    """``gradcam.png``, ``rollout.png`` (overlays) and ``explain.png`` (image + both) in
    ``out_dir``; returns the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    what = f"class {label} (p={prob:.2f})"
    for name, heat, title in (
        ("gradcam", cam, f"Grad-CAM (HiResCAM), block {block}: {what}"),
        ("rollout", rollout, "attention rollout ([CLS])"),
    ):
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        _overlay(ax, image, heat, title)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    axes[0].imshow(shown, cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)
    axes[0].set_title(f"input → {what}", fontsize=9)
    axes[0].axis("off")
    _overlay(axes[1], image, cam, f"Grad-CAM (block {block})")
    _overlay(axes[2], image, rollout, "attention rollout")
    fig.tight_layout()
    fig.savefig(out_dir / "explain.png", dpi=120)
    plt.close(fig)
    return out_dir / "explain.png"


def explain_image(
    model: ImageClassifier, spec: str, out_dir: Path, target: str | None, block: int
) -> Path:
    """``lmforge explain`` for a ViT checkpoint: the maps of the predicted class (or ``target``,
    a label name) for the image ``spec`` (see ``read_one_image``); returns explain.png."""
    image = read_one_image(spec, model)
    x = to_model_input(torch.from_numpy(image)[None])
    with eval_mode(model), torch.no_grad():
        probs = model(x).softmax(-1)[0]
    names = model.label_names
    if target is None:
        k = int(probs.argmax())
    elif target in names:
        k = names.index(target)
    else:
        raise ConfigError(f"--target {target!r} is not a label of this classifier "
                          f"({', '.join(names)})")  # fmt: skip
    cam = grad_cam(model, x, torch.tensor([k]), block, per_token=True)[0].numpy()
    rollout = attention_rollout(model, x)[0].numpy()
    shown_block = block % len(model.vit.blocks)
    return write_image_report(out_dir, image, cam, rollout, names[k], float(probs[k]), shown_block)
