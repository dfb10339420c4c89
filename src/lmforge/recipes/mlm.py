"""``lmforge mlm``: masked-language-model pretraining of the BERT-style encoder (Devlin et al. 2019).

Read top to bottom: resolve the config, prepare the corpus with the same BPE pipeline as
``lmforge pretrain`` (``data.prepare.prepare_data``: the shipped TinyShakespeare by default),
cut the token stream into windows (``TokenBatches``), mask 15 % of each window's tokens with
BERT's 80/10/10 rule (``mask_tokens``), train ``MaskedLMHead(Encoder)`` with the shared ``fit``
(loss = cross-entropy on the masked positions only), evaluate masked-token loss and accuracy on
the val split under fixed masks, and keep the best checkpoint.

The mask token: lmforge's BPE has three special tokens (``<|bos|>``, ``<|eos|>``, ``<|pad|>``)
and no ``[MASK]``. A packed pretraining stream never contains ``<|pad|>``, so its id serves
as the mask id (the tokenizer, and so the data pipeline, stay the one ``pretrain`` uses).

With no arguments it runs configs/mlm/cpu_demo.yaml.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from lmforge import runs
from lmforge.config import Section, to_yaml
from lmforge.data.loader import TokenBatches
from lmforge.data.prepare import DataConfig, is_prepared, prepare_data
from lmforge.data.shards import open_shard
from lmforge.data.tokenizer import load_tokenizer, special_token_ids
from lmforge.errors import ConfigError
from lmforge.eval.mlm import masked_lm_metrics
from lmforge.models.decoder import token_loss_sum
from lmforge.models.encoder import Encoder, EncoderConfig, MaskedLMHead
from lmforge.train import distributed
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)


class MlmConfig(Section):
    """Everything ``lmforge mlm`` reads."""

    task: Literal["mlm"] = Field("mlm", description="marks masked-LM encoder checkpoints")
    data: DataConfig = DataConfig()
    model: EncoderConfig = EncoderConfig()
    mask_prob: float = Field(0.15, gt=0, lt=1, description="share of tokens selected for the loss")
    eval_windows: int = Field(
        256, gt=0, description="val windows (of model.context_length tokens) scored per evaluation"
    )
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    dist: DistConfig = DistConfig()
    out_dir: str | None = Field(None, description="run folder; null = runs/mlm-<date>-<time>")

    @model_validator(mode="after")
    def _check(self) -> MlmConfig:
        check_warmup(self.sched, self.train.max_steps)
        return self


def mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    special_ids: list[int],
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ids (B, T) → (inputs (B, T), labels (B, T)).

    Each non-special token is selected with probability ``mask_prob``; a selected token is
    replaced by ``mask_id`` 80 % of the time, by a random non-special token 10 %, and left
    as is 10 % (so the model cannot tell which visible tokens it is scored on). ``labels``
    hold the original id at selected positions and -100 elsewhere (ignored by the loss).
    """
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    selected = (torch.rand(ids.shape, generator=generator) < mask_prob) & ~special
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=generator)  # one draw decides mask / random / keep
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[special_ids] = False
    regular = keep.nonzero().squeeze(1)  # the ids a random replacement may take
    random_ids = regular[torch.randint(len(regular), ids.shape, generator=generator)]
    inputs = torch.where(selected & (u < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (u >= 0.8) & (u < 0.9), random_ids, inputs)
    return inputs, labels


class MaskedBatches:
    """``TokenBatches`` windows → (masked inputs, labels) micro-batches for ``fit``.

    The windows' own next-token targets are dropped: an encoder sees the whole window.
    """

    def __init__(
        self,
        windows: TokenBatches,
        mask_id: int,
        special_ids: list[int],
        vocab_size: int,
        mask_prob: float,
        seed: int,
    ) -> None:
        self.windows, self.context = windows, windows.context
        self.mask_args = (mask_id, special_ids, vocab_size)
        self.mask_prob = mask_prob
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.windows.next_batch()  # (B, T)
        return mask_tokens(x, *self.mask_args, self.generator, self.mask_prob)

    def state_dict(self) -> dict[str, Any]:
        return {**self.windows.state_dict(), "mask_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.generator.set_state(state.pop("mask_rng"))
        self.windows.load_state_dict(state)


def mlm(cfg: MlmConfig) -> dict[str, Any]:
    """Run the pretraining; returns the summary also written to ``summary.json``."""
    with runs.training_run("mlm", cfg) as run:
        return _mlm(cfg, run)


def _mlm(cfg: MlmConfig, run: runs.Run) -> dict[str, Any]:
    par, run_dir, device = run.par, run.dir, run.par.device

    # Data: raw text → the BPE token shards of `lmforge pretrain` (reused when already prepared).
    prepared = cfg.data.path and is_prepared(cfg.data.path)
    data_dir = Path(cfg.data.path) if prepared else run_dir / "data"
    if par.is_main and not is_prepared(data_dir):
        prepare_data(cfg.data, data_dir, cfg.train.seed)
    par.barrier()  # the other ranks read the shards rank 0 wrote
    tokenizer_path = data_dir / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    specials = special_token_ids(tokenizer)
    if "pad" not in specials:
        raise ConfigError(f"{tokenizer_path}: no <|pad|> token to serve as the mask token")
    mask_id, special_ids = specials["pad"], sorted(set(specials.values()))
    vocab = tokenizer.get_vocab_size()
    enc_cfg = cfg.model.model_copy(update={"vocab_size": vocab, "pad_id": mask_id})
    cfg = cfg.model_copy(update={"model": enc_cfg})
    runs.write_config(run, cfg)

    torch.manual_seed(cfg.train.seed)
    model = MaskedLMHead(Encoder(enc_cfg)).to(device)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log.info("encoder + MLM head: %.2fM parameters, vocabulary %d", n_params / 1e6, vocab)

    T = enc_cfg.context_length
    # every rank draws the global micro-batch (and its masks) and keeps its rows: n ranks with
    # micro-batch b train on exactly what one process does with n x b
    global_batch = cfg.train.batch_size * par.dp_size
    windows = TokenBatches(open_shard(data_dir, "train"), T, global_batch, cfg.train.seed)
    batches = distributed.shard_batches(
        MaskedBatches(windows, mask_id, special_ids, vocab, cfg.mask_prob, cfg.train.seed), par
    )
    # Val: consecutive windows under masks drawn once, so every evaluation scores the same task.
    val = np.asarray(open_shard(data_dir, "val"), dtype=np.int64)
    n_win = min(cfg.eval_windows, len(val) // T)
    if n_win == 0:
        raise ConfigError(f"the val split has {len(val)} tokens, fewer than one window of {T}")
    val_ids = torch.from_numpy(val[: n_win * T].reshape(n_win, T))  # (N, T)
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    val_batches = [
        mask_tokens(val_ids[i : i + eval_bs], mask_id, special_ids, vocab, g, cfg.mask_prob)
        for i in range(0, n_win, eval_bs)
    ]
    prec = cfg.train.precision  # the autocast of training's forward, as eval/lm.py
    initial = masked_lm_metrics(model, val_batches, device, prec)
    log.info("before training: %s", initial)
    plain = model
    model = distributed.parallelize(  # the MLM head never uses the [CLS] pooler
        model, par, cfg.dist, cfg.train.precision, unused_parameters=enc_cfg.pooler
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
        checkpoint_files={"config.yaml": to_yaml(cfg), "tokenizer.json": tokenizer_path},
        loss_fn=token_loss_sum,  # summed CE over labels != -100: the masked positions only
        evaluate=distributed.evaluator(
            par, lambda m: masked_lm_metrics(m, val_batches, device, prec)
        ),
        monitor="val_mlm_loss",
        monitor_mode="min",
        parallel=par,
    )
    if not par.is_main:
        return {}
    summary = {
        "run_dir": str(run_dir),
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "parameters": n_params,
        "mask_id": mask_id,
        "val_windows": n_win,
        "initial_val_mlm_loss": initial["val_mlm_loss"],
        "initial_val_mlm_accuracy": initial["val_mlm_accuracy"],
        **result.last_eval,
        "best_val_mlm_loss": result.best_val_loss,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "wall_seconds": run.elapsed(),
    }
    return runs.finish(run, summary)
