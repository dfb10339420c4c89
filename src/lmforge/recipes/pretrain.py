"""``lmforge pretrain``: raw text → tokenizer and shards → decoder LM → checkpoints → a sample.

Read top to bottom: resolve the config, set up the run folder, prepare data, build the
model, fit, evaluate, save, sample. With no arguments it runs the CPU demo: the shipped
Shakespeare corpus, a small model sized for a 5-minute budget on a 2-core laptop CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from lmforge import runs
from lmforge.checkpoint.load import load
from lmforge.checkpoint.store import load_weights
from lmforge.config import Section, to_yaml
from lmforge.data.clean import find_files
from lmforge.data.loader import TokenBatches
from lmforge.data.prepare import DataConfig, is_prepared, load_meta, prepare_data
from lmforge.data.shards import open_shard
from lmforge.data.tokenizer import bos_id, eos_id, load_tokenizer
from lmforge.errors import ConfigError
from lmforge.generate import SampleConfig, generate_text
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train import distributed
from lmforge.train.device import peak_flops, setup_device
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import FitResult, TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.precision import weight_dtype

log = logging.getLogger(__name__)


class PretrainConfig(Section):
    """Everything ``lmforge pretrain`` reads. With no --config the command runs configs/pretrain/cpu_demo.yaml."""

    data: DataConfig = DataConfig()
    model: DecoderConfig = DecoderConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    sample: SampleConfig = SampleConfig()
    dist: DistConfig = DistConfig()
    out_dir: str | None = Field(None, description="run folder; null = runs/pretrain-<date>-<time>")
    resume: bool | str = Field(
        False, description="true = latest checkpoint in out_dir; or a checkpoint path"
    )

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        check_warmup(self.sched, self.train.max_steps)
        tp = self.dist.tp_size
        if tp > 1:
            sizes = {
                "model.n_head": self.model.n_head,
                "the kv heads (model.n_kv_head)": self.model.kv_heads,
                "the MLP width": self.model.ff_width,
            }
            for what, n in sizes.items():
                if n % tp:
                    raise ValueError(f"dist.tp_size={tp} must divide {what} ({n})")
        if self.resume is True and not self.out_dir:
            raise ValueError(
                "resume: --resume needs --out_dir=RUN_FOLDER (or --resume=CHECKPOINT_PATH)"
            )
        return self


DEFAULT_PRESET = "cpu_demo"


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run the whole pretraining job; returns the summary also written to ``summary.json``.

    Under torchrun every rank runs this function (``train/distributed.py``); rank 0 alone
    prepares data, writes files and samples; the other ranks return ``{}``.
    """
    t_start = time.perf_counter()
    device = setup_device(cfg.train.device, cfg.train.num_threads, cfg.train.precision)
    if cfg.data.path and not is_prepared(cfg.data.path):
        find_files(cfg.data.path)  # a wrong data.path fails here, before the run folder exists
    par = distributed.setup(cfg.dist, device, "pretrain")
    try:
        run = runs.start("pretrain", cfg.out_dir, cfg.resume, par)
        with runs.failure_note(run):
            return _pretrain(cfg, run, t_start)
    finally:
        distributed.teardown(par)


def _pretrain(cfg: PretrainConfig, run: runs.Run, t_start: float) -> dict[str, Any]:
    par, run_dir, resume_ckpt = run.par, run.dir, run.resume_from
    device = par.device
    if par.is_main:
        log.info("run folder: %s", run_dir)

    # Data: raw text → cleaned, deduplicated, tokenized shards (reused when already prepared).
    data_dir = (
        Path(cfg.data.path) if cfg.data.path and is_prepared(cfg.data.path) else run_dir / "data"
    )
    if par.is_main and not is_prepared(data_dir):
        prepare_data(cfg.data, data_dir, cfg.train.seed)
    par.barrier()  # the other ranks read the shards rank 0 wrote
    meta = load_meta(data_dir)
    tokenizer_path = data_dir / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({vocab})"
        )
    model_cfg = (
        cfg.model if cfg.model.vocab_size else cfg.model.model_copy(update={"vocab_size": vocab})
    )
    cfg = cfg.model_copy(update={"model": model_cfg})
    if cfg.train.memory_budget:  # micro-batch, accumulation, checkpointing that fit the budget
        from lmforge.plan.autofit import apply_memory_budget, train_workload

        fsdp = par.strategy in ("fsdp", "fsdp+tp")  # tp alone is estimated unsharded (more)
        w = train_workload(
            cfg.train, cfg.optim, model_cfg.context_length, device.type,
            world_size=par.world_size, sharding="zero3" if fsdp else "none",
        )  # fmt: skip
        train, _ = apply_memory_budget(cfg.train, w, model_cfg, device.type, run_dir)
        cfg = cfg.model_copy(update={"train": train})
    runs.write_config(run, cfg)

    # Model and optimizer.
    torch.manual_seed(cfg.train.seed)
    model = Decoder(model_cfg).to(device=device, dtype=weight_dtype(cfg.train.precision))
    if resume_ckpt is not None:
        load_weights(model, resume_ckpt)
    n_params, n_body = model.num_params(), model.num_params(non_embedding=True)
    flops_per_token = model.flops_per_token()
    plain = model
    model = distributed.parallelize(model, par, cfg.dist, cfg.train.precision)
    optimizer = build_optimizer(plain, cfg.optim)  # after sharding: on the sharded parameters
    log.info(
        "model: %s, %.2fM parameters (%.2fM without embeddings)",
        model_cfg.arch,
        n_params / 1e6,
        n_body / 1e6,
    )

    train_tokens, val_tokens = open_shard(data_dir, "train"), open_shard(data_dir, "val")
    batches = TokenBatches(
        train_tokens,
        model_cfg.context_length,
        cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=par.dp_rank,
        world_size=par.dp_size,
    )
    if par.active:
        log.info(
            "%s on %d processes (tp %d): global batch %d sequences = micro-batch %d x "
            "accumulation %d x data-parallel %d",
            par.strategy,
            par.world_size,
            par.tp_size,
            cfg.train.batch_size * cfg.train.grad_accum * par.dp_size,
            cfg.train.batch_size,
            cfg.train.grad_accum,
            par.dp_size,
        )
    peak, peak_source = peak_flops(device, cfg.train.precision)
    if peak:
        peak *= par.world_size  # MFU of the whole job: tokens/s is summed over ranks

    result: FitResult = fit(
        model,
        optimizer,
        batches,
        cfg.train,
        peak_lr=cfg.optim.lr,
        sched=cfg.sched,
        run_dir=run_dir,
        device=device,
        checkpoint_files={"config.yaml": to_yaml(cfg), "tokenizer.json": tokenizer_path},
        val_tokens=val_tokens if len(val_tokens) > 1 else None,
        val_bytes=meta["val_bytes"],
        resume_from=resume_ckpt,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        parallel=par,
    )
    if not par.is_main:
        return {}

    if par.sharded and result.checkpoint is not None:  # sample from the gathered weights
        plain = load(result.checkpoint, device, expect="decoder").model
    sample = generate_text(
        plain,
        tokenizer,
        cfg.sample.prompt,
        cfg.sample,
        bos_id=bos_id(tokenizer),
        eos_id=eos_id(tokenizer),
    )
    mfu = result.tokens_per_s * flops_per_token / peak if peak else None
    summary = {
        "run_dir": str(run_dir),
        "steps": result.step,
        "stop_reason": result.stop_reason,
        **result.last_eval,
        "best_val_loss": result.best_val_loss,
        "parameters": n_params,
        "tokens_per_s": result.tokens_per_s,
        "flops_per_token": flops_per_token,
        "mfu": mfu,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "sample_prompt": cfg.sample.prompt,
        "sample": sample,
    }
    return runs.finish(run, summary)
