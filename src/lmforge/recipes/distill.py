"""``lmforge distill --teacher PATH``: train a smaller model (the student) on a teacher's
distributions — loss = α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE (``compress/distill.py``) —
with the shared training loop, on the teacher's tokenizer.

    lmforge distill --teacher runs/pretrain-… --student.n_layer=2 --student.d_model=128
    lmforge distill --teacher runs/classify-… --student_encoder.n_layer=2   # a classifier

A decoder teacher: next-token distributions on a text. A sequence-classifier teacher (written
by ``lmforge classify``): class distributions on its own training file (its config.yaml names
the columns and labels); the student is a smaller encoder with the teacher's head and
tokenizer, scored by accuracy and macro-F1 on the teacher's test file (or the shipped one).

Setup → text split into training text and a held-out tail → teacher loaded and frozen →
student built from ``student`` (vocabulary and context from the teacher unless set) → fit →
both scored on the held-out tail. The run folder is a pretraining run folder: its
checkpoints load wherever a checkpoint is accepted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from lmforge import runs
from lmforge.checkpoint.load import load
from lmforge.compress.distill import TeacherSignal
from lmforge.compress.measure import SHIPPED_TEXT, held_out, lm_quality, read_text
from lmforge.compress.short_fit import fit_on_tokens
from lmforge.config import Section
from lmforge.errors import ConfigError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import EncoderConfig
from lmforge.train.device import setup_device
from lmforge.train.loop import TrainConfig
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig

log = logging.getLogger(__name__)


class DistillConfig(Section):
    """Everything ``lmforge distill`` reads."""

    teacher: str = Field(
        description="teacher checkpoint: lmforge checkpoint or run folder (its latest), "
        "Hugging Face folder or .gguf file (a decoder)"
    )
    student: DecoderConfig = Field(
        DecoderConfig(arch="llama", n_layer=2, n_head=4, d_model=128, context_length=128),
        description="the student's architecture; vocab_size null = the teacher's (it must be)",
    )
    student_encoder: EncoderConfig = Field(
        EncoderConfig(n_layer=2, n_head=4, d_model=128, dropout=0.1),
        description="a classifier teacher: the student encoder (vocabulary, padding id and "
        "positions from the teacher)",
    )
    data: str | None = Field(
        None,
        description="decoders: UTF-8 training text (null = the shipped TinyShakespeare); "
        "classifiers: labelled training file (null = the teacher's data.train, else shipped)",
    )
    max_eval_bytes: int = Field(
        100_000, gt=0, description="bytes at the end of data held out and scored"
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the distillation term (1 − alpha: cross-entropy)"
    )
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the KL term")
    top_k: int | None = Field(
        None, gt=0, description="keep the teacher's k largest logits per token; null = all"
    )
    train: TrainConfig = TrainConfig(max_steps=300, batch_size=16, eval_every=100,
                                     save_every=300, device="cpu")  # fmt: skip
    optim: OptimConfig = OptimConfig(lr=2e-3, weight_decay=0.1)
    sched: SchedConfig = SchedConfig(name="cosine", warmup_steps=30)
    out_dir: str | None = Field(None, description="run folder; null = runs/distill-<date>-<time>")

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        check_warmup(self.sched, self.train.max_steps)
        return self


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run the distillation; returns the summary also written to ``summary.json``."""
    t_start = time.perf_counter()
    device = setup_device(cfg.train.device, cfg.train.num_threads, cfg.train.precision)
    if device.type != "cpu":
        raise ConfigError(
            "train.device: lmforge distill runs on the CPU for now (train.device=cpu)"
        )
    loaded = load(cfg.teacher, device, expect=("decoder", "sequence-classifier"))
    if loaded.manifest.kind == "sequence-classifier":
        return _distill_classifier(cfg, loaded, t_start)
    text = read_text(cfg.data or SHIPPED_TEXT)
    teacher, tokenizer, manifest = loaded
    vocab = teacher.cfg.vocab_size
    if cfg.student.vocab_size not in (None, vocab):
        raise ConfigError(
            f"student.vocab_size ({cfg.student.vocab_size}) must equal the teacher's ({vocab}): "
            "the KL term compares distributions over the same vocabulary; leave it null"
        )
    student_cfg = cfg.student.model_copy(update={"vocab_size": vocab})
    context = min(student_cfg.context_length, teacher.cfg.context_length)
    cfg = cfg.model_copy(update={"student": student_cfg})
    tail = held_out(text, cfg.max_eval_bytes)
    train_ids = np.asarray(tokenizer.encode(text[: len(text) - len(tail)]).ids, dtype=np.int64)
    val_ids = np.asarray(tokenizer.encode(tail).ids, dtype=np.int64)
    if len(train_ids) < context + 1:
        raise ConfigError(
            f"data: {len(train_ids)} training tokens before the held-out {cfg.max_eval_bytes} "
            f"bytes; one window needs {context + 1}: use more text or a smaller max_eval_bytes"
        )
    run = runs.start("distill", cfg.out_dir)
    with runs.failure_note(run):
        runs.write_config(run, cfg)
        torch.manual_seed(cfg.train.seed)
        student = Decoder(student_cfg)
        signal = TeacherSignal(teacher, student, cfg.alpha, cfg.temperature, cfg.top_k)
        import yaml

        ckpt_config = yaml.safe_dump(
            {"model": student_cfg.model_dump(mode="json")}, sort_keys=False
        )
        tok_path = run.dir / "tokenizer.json"
        tok_path.write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        try:
            result = fit_on_tokens(
                student, train_ids, run.dir, cfg.train, cfg.optim, cfg.sched, context,
                loss_fn=signal.loss_fn, val_tokens=val_ids, val_bytes=len(tail.encode("utf-8")),
                checkpoint_files={"config.yaml": ckpt_config, "tokenizer.json": tok_path},
            )  # fmt: skip
        finally:
            signal.remove()
        teacher_q = lm_quality(teacher, tokenizer, tail)
        student_q = lm_quality(student, tokenizer, tail)
        summary = {
            "run_dir": str(run.dir),
            "teacher": str(manifest.path),
            "teacher_parameters": teacher.num_params(),
            "student_parameters": student.num_params(),
            "steps": result.step,
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "teacher_val_bpb": teacher_q["val_bpb"],
            "student_val_bpb": student_q["val_bpb"],
            "tokens_per_s": result.tokens_per_s,
            "wall_seconds": time.perf_counter() - t_start,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
        return runs.finish(run, summary)


def _distill_classifier(cfg: DistillConfig, loaded: Any, t_start: float) -> dict[str, Any]:
    """The classifier form: teacher and student see the same batches of the labelled file."""
    import yaml

    from lmforge.compress.measure import SHIPPED_LABELLED, classifier_quality
    from lmforge.config import read_yaml, validate_config
    from lmforge.data.classification import (
        ClassificationBatches,
        ClassifyDataConfig,
        default_paths,
        encode_labels,
        encode_texts,
        read_examples,
    )
    from lmforge.models.encoder import Encoder, HeadConfig, SequenceClassifier
    from lmforge.train.loop import fit
    from lmforge.train.optim import build_optimizer

    teacher, tokenizer, manifest = loaded
    saved = read_yaml(manifest.path / "config.yaml")
    where = f"{manifest.path / 'config.yaml'}"
    data_cfg = validate_config(ClassifyDataConfig, saved.get("data", {}), f"{where} (data)")
    head = validate_config(HeadConfig, saved.get("head") or {}, f"{where} (head)")
    if head.task != "sequence" or data_cfg.multi_label:
        raise ConfigError(f"{manifest.path}: distill takes single-label sequence classifiers")
    train_path = cfg.data or data_cfg.train or str(default_paths()["train"])
    test_path = data_cfg.test or str(SHIPPED_LABELLED)
    examples = read_examples(train_path, data_cfg)
    y = encode_labels(examples, data_cfg.labels or [], False)
    rows = encode_texts(tokenizer, examples, data_cfg.max_length)
    t_enc = teacher.encoder.cfg
    enc = cfg.student_encoder.model_copy(update={"vocab_size": t_enc.vocab_size,
                                                 "pad_id": t_enc.pad_id,
                                                 "context_length": t_enc.context_length})  # fmt: skip
    cfg = cfg.model_copy(update={"student_encoder": enc})
    run = runs.start("distill", cfg.out_dir)
    with runs.failure_note(run):
        runs.write_config(run, cfg)
        torch.manual_seed(cfg.train.seed)
        student = SequenceClassifier(Encoder(enc), head)
        signal = TeacherSignal(teacher, student, cfg.alpha, cfg.temperature, cfg.top_k)
        batches = _ClassifierBatches(
            ClassificationBatches(rows, y, cfg.train.batch_size, cfg.train.seed, t_enc.pad_id)
        )
        saved_cfg = {**saved, "model": enc.model_dump(mode="json")}
        tok_path = run.dir / "tokenizer.json"
        tok_path.write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        try:
            result = fit(
                student, build_optimizer(student, cfg.optim), batches, cfg.train,
                peak_lr=cfg.optim.lr, sched=cfg.sched, run_dir=run.dir, device=torch.device("cpu"),
                checkpoint_files={"config.yaml": yaml.safe_dump(saved_cfg, sort_keys=False),
                                  "tokenizer.json": tok_path},
                loss_fn=signal.loss_fn,
            )  # fmt: skip
        finally:
            signal.remove()
        best = load(run.dir, expect="sequence-classifier")  # the student as written
        teacher_q = classifier_quality(teacher, tokenizer, manifest, test_path)
        student_q = classifier_quality(best.model, tokenizer, best.manifest, test_path)
        summary = {
            "run_dir": str(run.dir),
            "teacher": str(manifest.path),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "steps": result.step,
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "test_data": test_path,
            **{f"teacher_{k}": v for k, v in teacher_q.items()},
            **{f"student_{k}": v for k, v in student_q.items()},
            "wall_seconds": time.perf_counter() - t_start,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
        return runs.finish(run, summary)


class _ClassifierBatches:
    """``ClassificationBatches`` in ``fit``'s (idx, y, keyword tensors) form (as classify's
    own adapter; recipes do not import each other)."""

    def __init__(self, batches: Any) -> None:
        self.batches, self.context = batches, batches.context

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        inputs, y = self.batches.next_batch()
        return inputs["idx"], y, {k: v for k, v in inputs.items() if k != "idx"}

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)
