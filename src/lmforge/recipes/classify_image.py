"""``lmforge classify-image``: train a Vision Transformer to classify images.

Read top to bottom: resolve the config, read the images (a folder per class, an ``.npz``, or
— with no arguments — scikit-learn's 8×8 handwritten digits), split them stratified, build a
ViT sized to the images, fit with the shared ``fit`` (augmentation and MixUp/CutMix on each
training batch, best checkpoint and early stopping on a val metric; ``--resume`` continues
exactly), then evaluate the best checkpoint on the test split and write ``eval/`` — the report
text classification writes
(accuracy, macro-F1, confusion matrix, ROC, PR, calibration, worst examples).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from lmforge import runs
from lmforge.checkpoint.store import load_weights, pointed
from lmforge.config import Section, to_yaml
from lmforge.data.image_augment import AugmentConfig, augment, mix
from lmforge.data.images import ImageDataConfig, ImageSet, read_splits, to_model_input
from lmforge.data.loader import MicroBatch
from lmforge.errors import ConfigError
from lmforge.eval.classification import evaluate_images, scalars
from lmforge.eval.report import classification_report
from lmforge.models.vit import ImageClassifier, ViTConfig
from lmforge.train.device import setup_device
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)

VAL_LOGGED = ("accuracy", "f1_macro", "roc_auc", "loss")


class ClassifyImageConfig(Section):
    """Everything ``lmforge classify-image`` reads."""

    task: Literal["classify-image"] = Field(
        "classify-image", description="marks image-classifier checkpoints"
    )
    data: ImageDataConfig = ImageDataConfig()
    model: ViTConfig = Field(
        ViTConfig(), description="the ViT; image_size, num_channels, num_labels, labels are "
        "filled from the data",
    )  # fmt: skip
    augment: AugmentConfig = AugmentConfig()
    monitor: Literal["accuracy", "f1_macro", "val_loss"] = Field(
        "accuracy", description="val metric for the best checkpoint and early stopping"
    )
    train: TrainConfig = TrainConfig(
        max_steps=900, batch_size=64, eval_every=100, save_every=300, keep_last=1,
        log_every=20, early_stop_patience=4, num_threads=2,
    )  # fmt: skip
    optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999))
    sched: SchedConfig = SchedConfig(warmup_steps=60, min_lr_ratio=0.0)
    out_dir: str | None = Field(
        None, description="run folder; null = runs/classify-image-<date>-<time>"
    )
    resume: bool | str = Field(
        False,
        description="true = continue the run in out_dir from its latest checkpoint; or a "
        "checkpoint / run folder of the run to continue",
    )


class ImageBatches:
    """Endless shuffled, augmented training batches as ``fit``'s ``BatchSource``.

    y is (B, K) class probabilities (one-hot, or MixUp/CutMix-mixed). ``fit`` counts every
    y element as a target, i.e. B·K per batch, so ``image_loss`` multiplies the summed
    cross-entropy by K: the normalised loss is then the mean per image. The augmentation
    draws are seeded from (seed, batches drawn), so a resumed run draws the same batches.
    """

    context = 1  # fit's token-window length; unused (no val_tokens)

    def __init__(self, data: ImageSet, batch_size: int, seed: int, aug: AugmentConfig) -> None:
        self.images = torch.from_numpy(data.images)
        self.targets = F.one_hot(torch.from_numpy(data.labels), len(data.names)).float()
        self.batch_size, self.seed, self.aug = min(batch_size, len(data)), seed, aug
        self.drawn = 0

    def next_batch(self) -> MicroBatch:
        n, b = len(self.images), self.batch_size
        per_epoch = n // b  # the last partial batch of an epoch is dropped
        epoch, pos = divmod(self.drawn, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        index = order[pos * b : (pos + 1) * b]
        seed = self.seed * 1_000_003 + 2 * self.drawn
        self.drawn += 1
        x = augment(self.images[index], self.aug, seed)
        x, y = mix(x, self.targets[index], self.aug, seed + 1)
        return to_model_input(x), y, {}

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn = int(state["drawn"])


def image_loss(model: ImageClassifier):
    """``fit``'s loss_fn: (logits, soft targets (B, K)) → (summed loss × K, B·K); see above."""

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return model.loss_sum(logits, y) * y.size(1), y.numel()

    return loss_fn


def classify_image(cfg: ClassifyImageConfig) -> dict[str, Any]:
    """Run the training; returns the summary also written to ``summary.json``."""
    t_start = time.perf_counter()
    check_warmup(cfg.sched, cfg.train.max_steps)
    device = setup_device(cfg.train.device, cfg.train.num_threads, cfg.train.precision)
    run = runs.start("classify-image", cfg.out_dir, cfg.resume)
    with runs.failure_note(run):
        return _classify_image(cfg, run, device, t_start)


def _classify_image(
    cfg: ClassifyImageConfig, run: runs.Run, device: torch.device, t_start: float
) -> dict[str, Any]:
    run_dir = run.dir
    log.info("run folder: %s", run_dir)
    train, val, test = read_splits(cfg.data)
    _, c, h, _ = train.images.shape
    log.info("classes %s; train %d, val %d, test %d images of %dx%dx%d",
             train.names, len(train), len(val), len(test), c, h, h)  # fmt: skip

    # the architecture follows the data: image side, channels and classes are filled in
    try:
        model_cfg = ViTConfig.model_validate(
            cfg.model.model_dump()
            | dict(image_size=h, num_channels=c, num_labels=len(train.names), labels=train.names)
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    torch.manual_seed(cfg.train.seed)
    model = ImageClassifier(model_cfg).to(device)
    if run.resume_from is not None:  # fit restores the optimizer, batch cursor and RNGs
        load_weights(model, run.resume_from)
    log.info("ViT: %.3fM parameters, %d patches", model.vit.num_params() / 1e6,
             model_cfg.n_patches)  # fmt: skip
    data_cfg = cfg.data.model_copy(update={"image_size": h})
    cfg = cfg.model_copy(update={"model": model_cfg, "data": data_cfg})
    runs.write_config(run, cfg)

    eval_bs = cfg.train.eval_batch_size or 256

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_images(m, val, eval_bs, device)  # type: ignore[arg-type]
        return {f"val_{k}": float(metrics[k]) for k in VAL_LOGGED}

    result = fit(
        model,
        build_optimizer(model, cfg.optim),
        ImageBatches(train, cfg.train.batch_size, cfg.train.seed, cfg.augment),
        cfg.train,
        peak_lr=cfg.optim.lr,
        sched=cfg.sched,
        run_dir=run_dir,
        device=device,
        checkpoint_files={"config.yaml": to_yaml(cfg)},
        loss_fn=image_loss(model),
        evaluate=evaluate,
        monitor=f"val_{cfg.monitor.removeprefix('val_')}",
        monitor_mode="min" if cfg.monitor == "val_loss" else "max",
        resume_from=run.resume_from,
    )

    best = pointed(run_dir / "checkpoints", "best") or result.checkpoint
    load_weights(model, best)
    metrics, probs = evaluate_images(model, test, eval_bs, device)
    info = {"checkpoint": str(best), "data": test.source + " (test split)" if not cfg.data.test
            else test.source, "labels": ", ".join(test.names)}  # fmt: skip
    shown = [f"image {i}" for i in range(len(test))]
    classification_report(run_dir / "eval", metrics, test.labels, probs, test.names, shown, info)
    summary = {
        "run_dir": str(run_dir),
        "labels": train.names,
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "parameters": model.vit.num_params(),
        "augment": cfg.augment.enabled,
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "best_checkpoint": str(best),
        **{f"eval_{k}": v for k, v in scalars(metrics).items()},
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "report": str(Path(run_dir) / "eval" / "report.md"),
    }
    return runs.finish(run, summary)
