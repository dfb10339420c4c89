"""Labelled images for ``lmforge classify-image``: a folder per class, an ``.npz`` of arrays, or
the 8×8 handwritten digits that ship inside scikit-learn (the demo).

Everything becomes one ``ImageSet``: pixels float32 (N, C, H, W) in [0, 1], class ids (N,) and
class names. ``to_model_input`` maps [0, 1] to [-1, 1] (Hugging Face ViT's 0.5 mean / 0.5 std),
the one normalisation training, evaluation and ``explain`` share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.model_selection import train_test_split

from lmforge.config import Section
from lmforge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NPZ_IMAGES = ("images", "x", "X")
NPZ_LABELS = ("labels", "y")


@dataclass
class ImageSet:
    """images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64 class ids into ``names``."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]
    source: str

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.names, self.source)

    def __len__(self) -> int:
        return len(self.labels)


def digits() -> ImageSet:
    """scikit-learn's 1,797 handwritten digits, 8×8 grey, 16 intensity levels (UCI optdigits)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8), 0..16 → 0..1
    return ImageSet(images, d.target.astype(np.int64), [str(n) for n in d.target_names], "digits")


def read_images(path: str | Path, names: list[str] | None = None) -> ImageSet:
    """A folder with one sub-folder of images per class, or an ``.npz`` (see ``read_npz``).

    ``names``: the class names to map to ids (a test set must use the training set's);
    None = the classes found, sorted.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder (give a folder of class folders or a .npz)")
    if p.is_file() and p.suffix != ".npz":
        raise DataError(f"{p}: not a .npz; give a folder of class folders or a .npz of arrays")
    data = read_npz(p) if p.is_file() else read_folder(p)
    return relabel(data, names) if names is not None else data


def relabel(data: ImageSet, names: list[str]) -> ImageSet:
    """The same images with class ids into ``names``; an unknown class is an error naming it."""
    if unknown := sorted(set(data.names) - set(names)):
        raise DataError(
            f"{data.source}: classes {unknown} are not among the training classes {names}"
        )
    lookup = np.array([names.index(n) for n in data.names], dtype=np.int64)
    return ImageSet(data.images, lookup[data.labels], list(names), data.source)


def read_npz(path: Path) -> ImageSet:
    """``images`` (or ``x``): (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 0..255 or float
    0..1; ``labels`` (or ``y``): (N,) ints or strings; optional ``label_names``."""
    try:
        with np.load(path, allow_pickle=False) as npz:  # never unpickle a data file
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    x_key = next((k for k in NPZ_IMAGES if k in arrays), None)
    y_key = next((k for k in NPZ_LABELS if k in arrays), None)
    if x_key is None or y_key is None:
        raise DataError(
            f"{path}: needs arrays 'images' (or 'x') and 'labels' (or 'y'); has {sorted(arrays)}"
        )
    x, y = arrays[x_key], arrays[y_key]
    if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{path}: '{x_key}' {x.shape} and '{y_key}' {y.shape}: expected (N, H, W[, C]) "
            "images and N labels"
        )
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # channels last → first
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataError(
                f"{path}: float '{x_key}' must lie in [0, 1] (found {x.min():.3g}..{x.max():.3g});"
                " scale it, or store uint8 0..255"
            )
    else:
        raise DataError(f"{path}: '{x_key}' has dtype {x.dtype}; use uint8 0..255 or float 0..1")
    if "label_names" in arrays and np.issubdtype(y.dtype, np.integer):
        names = [str(n) for n in arrays["label_names"]]
        if y.min() < 0 or y.max() >= len(names):
            raise DataError(f"{path}: labels outside 0..{len(names) - 1} of 'label_names'")
        ids = y.astype(np.int64)
    else:
        names = sorted({str(v) for v in y}, key=_natural)
        ids = np.array([names.index(str(v)) for v in y], dtype=np.int64)
    return ImageSet(np.ascontiguousarray(x), ids, names, str(path))


def read_folder(folder: Path) -> ImageSet:
    """``folder/<class>/<image>``: every class folder's images, resized to the first image's
    size; grey unless some image has colour (then all are RGB)."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: _natural(d.name))
    files = [
        (f, i)
        for i, d in enumerate(classes)
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if len(classes) < 2 or not files:
        raise DataError(
            f"{folder}: needs one sub-folder of images ({', '.join(IMAGE_SUFFIXES)}) per class, "
            f"at least two classes; found {len(classes)} folders and {len(files)} images"
        )
    pictures = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                pictures.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: not a readable image ({e}); remove or replace it") from None
    colour = any(im.mode not in ("L", "1", "I", "I;16", "F", "LA") for im in pictures)
    size = pictures[0].size
    arrays = []
    for im in pictures:
        im = im.convert("RGB" if colour else "L").resize(size, Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(a.transpose(2, 0, 1) if colour else a[None])
    labels = np.array([i for _, i in files], dtype=np.int64)
    return ImageSet(np.stack(arrays), labels, [d.name for d in classes], str(folder))


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) → (N, C, size, size), bilinear (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    x = torch.from_numpy(images)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).numpy()


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels → [-1, 1], as Hugging Face's ViT image processor (mean 0.5, std 0.5)."""
    return (images - 0.5) / 0.5


def _natural(name: str) -> tuple[int, int | str]:
    """Numeric class names sort as numbers (2 before 10), others alphabetically after them."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


class ImageDataConfig(Section):
    """Where the labelled images come from and how they are split."""

    path: str | None = Field(
        None, description="folder of class folders, or .npz (images, labels); null = the 8×8 "
        "digits shipped in scikit-learn",
    )  # fmt: skip
    test: str | None = Field(None, description="held-out images; null = split test_fraction off")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="test split when test is null")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="of the rest, the val split")
    image_size: int | None = Field(
        None, gt=0, description="resize every image to this square side; null = keep (square)"
    )
    split_seed: int = Field(0, description="seed of the stratified splits")


def _stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(len(labels))
    try:
        a, b = train_test_split(index, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as e:  # a class with a single image cannot be in both parts
        raise DataError(f"cannot split the images stratified: {e}; add images of rare classes "
                        "or give data.test") from None  # fmt: skip
    return np.sort(a), np.sort(b)


def read_splits(dcfg: ImageDataConfig) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(train, val, test), resized to ``image_size`` when set; test from data.test or a split."""
    full = read_images(dcfg.path) if dcfg.path else digits()
    if dcfg.test:
        test = read_images(dcfg.test, names=full.names)
        rest = full
    else:
        keep, held = _stratified(full.labels, dcfg.test_fraction, dcfg.split_seed)
        rest, test = full.subset(keep), full.subset(held)
    tr, va = _stratified(rest.labels, dcfg.val_fraction, dcfg.split_seed)
    train, val = rest.subset(tr), rest.subset(va)
    sets = [train, val, test]
    size = dcfg.image_size
    if size is None:
        shapes = {s.images.shape[1:] for s in sets}
        h, w = train.images.shape[-2:]
        if len(shapes) > 1 or h != w:
            raise DataError(f"images of shapes {sorted(shapes)}: set data.image_size to resize "
                            "them all to one square side")  # fmt: skip
    else:
        for s in sets:
            s.images = resize(s.images, size)
    if test.images.shape[1] != train.images.shape[1]:
        raise DataError(f"{test.source}: {test.images.shape[1]} colour channels, the training "
                        f"images have {train.images.shape[1]}")  # fmt: skip
    return train, val, test
