"""``lmforge seq2seq``: fine-tune a T5- or BART-style encoder-decoder on source→target pairs.

Read top to bottom: resolve the run folder, read the pairs (JSONL ``{"source", "target"}``;
with no ``train_file`` the generated date-normalisation demo), take the tokenizer and model from
``init`` (an lmforge seq2seq run or a Hugging Face T5/BART folder, through ``lmforge.load``) or
train a BPE on the pairs and build ``model`` from scratch, score greedy generations on the val
pairs (BLEU, chrF, ROUGE-L, exact match: ``eval/metrics.generation_metrics``), train with the
shared ``fit`` (summed cross-entropy on the target tokens), score again, keep the best
checkpoint by val chrF.

``objective: span_corruption`` (T5) or ``text_infilling`` (BART) pretrains instead: the texts
(each source and target of the pairs, or the lines of a ``.txt`` train_file) are corrupted
afresh each time they are drawn and the model learns to restore them; val texts are corrupted
once and scored the same way (special tokens kept in the scored text).

With no arguments: a 2+2-layer T5-style model learns to rewrite dates (six formats → ISO 8601)
from 4,000 generated pairs on the CPU in a few minutes; before/after scores are printed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from tokenizers import Tokenizer

from lmforge import runs
from lmforge.config import Section, to_yaml
from lmforge.data.seq2seq import (
    Noise,
    PairBatches,
    date_pairs,
    read_pairs,
    span_corruption,
    text_infilling,
)
from lmforge.data.tokenizer import save_tokenizer, special_token_ids, train_tokenizer
from lmforge.errors import ConfigError, DataError
from lmforge.eval.metrics import generation_metrics
from lmforge.eval.mode import eval_mode
from lmforge.models.decoder import token_loss_sum
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig, generate
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig, check_warmup
from lmforge.train.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]


class Seq2SeqTaskConfig(Section):
    """Everything ``lmforge seq2seq`` reads; the defaults are the CPU demo."""

    task: Literal["seq2seq"] = Field("seq2seq", description="marks encoder-decoder checkpoints")
    train_file: str | None = Field(
        None, description='JSONL of {"source", "target"}; null = the generated date demo'
    )
    val_file: str | None = Field(None, description="JSONL val pairs; null = split off train")
    objective: Literal["pairs", "span_corruption", "text_infilling"] = Field(
        "pairs",
        description="pairs: learn source→target; span_corruption (T5) / text_infilling (BART): "
        "pretrain on the texts (a .txt train_file: one text per line)",
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out as val")
    demo_examples: int = Field(4000, gt=10, description="demo: generated pairs")
    init: str | None = Field(
        None, description="start from this checkpoint (lmforge seq2seq run, HF T5/BART folder)"
    )
    vocab_size: int = Field(512, gt=0, description="BPE trained on the pairs (no init)")
    model: Seq2SeqConfig = Seq2SeqConfig(
        style="t5", d_model=128, n_head=4, d_ff=256, mlp="gated-gelu", dropout=0.0
    )
    max_source_tokens: int = Field(128, gt=1, description="longer sources are cut")
    max_target_tokens: int = Field(64, gt=1, description="longer targets are cut")
    eval_examples: int = Field(200, gt=0, description="val pairs scored per evaluation")
    eval_batch_size: int = Field(100, gt=0, description="pairs generated at once")
    train: TrainConfig = TrainConfig(
        max_steps=700, batch_size=32, eval_every=350, save_every=350, keep_last=1, log_every=25
    )
    optim: OptimConfig = OptimConfig(lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    sched: SchedConfig = SchedConfig(name="linear", warmup_steps=50, min_lr_ratio=0.0)
    out_dir: str | None = Field(None, description="run folder; null = runs/seq2seq-<date>-<time>")

    @model_validator(mode="after")
    def _check(self) -> Seq2SeqTaskConfig:
        check_warmup(self.sched, self.train.max_steps)
        return self


SENTINELS = [f"<extra_id_{i}>" for i in range(100)]  # T5's names, so T5 tokenizers have them
MASK = "<mask>"  # BART's


def _read(path: str) -> list[tuple[str, str]]:
    if not path.endswith(".txt"):
        return read_pairs(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    lines = [x for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    return [(x, x) for x in lines]


def _pairs(cfg: Seq2SeqTaskConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) pairs: from the files, or the generated demo; val split off when not given.
    For a pretraining objective every source and target becomes a text (a pair (text, text))."""
    pairs = _read(cfg.train_file) if cfg.train_file else date_pairs(cfg.demo_examples, 0)
    if cfg.objective != "pairs":
        pairs = list(dict.fromkeys((t, t) for pair in pairs for t in pair))
    if cfg.val_file:
        return pairs, _read(cfg.val_file)
    n_val = max(1, round(len(pairs) * cfg.val_fraction))
    if len(pairs) - n_val < 1:
        raise DataError(f"{cfg.train_file}: {len(pairs)} pairs; need at least 2 (train + val)")
    return pairs[:-n_val], pairs[-n_val:]


def _encode(
    tok: Tokenizer, pairs: list[tuple[str, str]], cfg: Seq2SeqTaskConfig, eos: int
) -> list[Example]:
    """Each text → ids + eos, cut to the configured maximum."""
    src = tok.encode_batch([s for s, _ in pairs], add_special_tokens=False)
    tgt = tok.encode_batch([t for _, t in pairs], add_special_tokens=False)
    return [
        (s.ids[: cfg.max_source_tokens - 1] + [eos], t.ids[: cfg.max_target_tokens - 1] + [eos])
        for s, t in zip(src, tgt, strict=True)
    ]


def _noise(cfg: Seq2SeqTaskConfig, tok: Tokenizer, eos: int) -> Noise | None:
    """The objective as a function ids → (inputs + eos, targets + eos); None for pairs."""
    if cfg.objective == "pairs":
        return None
    names = SENTINELS if cfg.objective == "span_corruption" else [MASK]
    ids = [tok.token_to_id(n) for n in names]
    if None in ids:
        raise ConfigError(
            f"objective={cfg.objective} needs the tokens {names[0]}… in the tokenizer of "
            f"{cfg.init}; use a tokenizer that has them, or train one (no --init)"
        )

    def noise(text: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        if cfg.objective == "span_corruption":
            inputs, targets = span_corruption(text, ids, rng)
        else:
            inputs, targets = text_infilling(text, ids[0], rng)
        return inputs + [eos], targets + [eos]

    return noise


def score(
    model: Seq2Seq,
    tok: Tokenizer,
    examples: list[Example],
    references: list[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    keep_specials: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """Greedy generations for ``examples`` scored against ``references`` →
    ({"val_bleu", "val_chrf", "val_rougeL", "val_exact_match", ...}, predictions)."""
    cfg = model.cfg
    predictions: list[str] = []
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            rows = [s for s, _ in examples[i : i + batch_size]]
            S = max(map(len, rows))
            x = torch.full((len(rows), S), cfg.pad_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, r in enumerate(rows):
                x[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
            out = generate(model, x.to(device), mask.to(device), max_new_tokens).tolist()
            for ids in out:
                ids = ids[: ids.index(cfg.eos_id)] if cfg.eos_id in ids else ids
                text = tok.decode(ids, skip_special_tokens=not keep_specials)
                predictions.append(text.strip())
    metrics = generation_metrics(predictions, references)
    return {f"val_{k}": float(v) for k, v in metrics.items() if k != "n"}, predictions


def _model_and_tokenizer(
    cfg: Seq2SeqTaskConfig, train_pairs: list[tuple[str, str]]
) -> tuple[Seq2Seq, Tokenizer]:
    if cfg.init:
        from lmforge.checkpoint.load import load

        if cfg.model != Seq2SeqTaskConfig.model_fields["model"].default:
            raise ConfigError(
                f"--init={cfg.init} brings its own architecture: model.* settings would be "
                "ignored; drop them (or drop --init to build `model` from scratch)"
            )

        model, tok, _ = load(cfg.init, expect="encoder-decoder")
        assert isinstance(model, Seq2Seq)
        return model.train(), tok
    tok = train_tokenizer((f"{s}\n{t}" for s, t in train_pairs), cfg.vocab_size)
    if cfg.objective != "pairs":
        tok.add_special_tokens([MASK, *SENTINELS])
    ids = special_token_ids(tok)
    model_cfg = cfg.model.model_copy(
        update=dict(
            vocab_size=tok.get_vocab_size(),
            pad_id=ids["pad"],
            eos_id=ids["eos"],
            decoder_start_id=ids["pad"],  # T5's convention: decoding starts from padding
        )
    )
    torch.manual_seed(cfg.train.seed)
    return Seq2Seq(Seq2SeqConfig.model_validate(model_cfg.model_dump())), tok


def seq2seq(cfg: Seq2SeqTaskConfig) -> dict[str, Any]:
    """Run the fine-tuning; returns the summary also written to ``summary.json``."""
    with runs.training_run("seq2seq", cfg) as run:  # one process: it has no dist section
        return _seq2seq(cfg, run)


def _seq2seq(cfg: Seq2SeqTaskConfig, run: runs.Run) -> dict[str, Any]:
    run_dir, device = run.dir, run.par.device
    train_pairs, val_pairs = _pairs(cfg)
    model, tok = _model_and_tokenizer(cfg, train_pairs)
    model = model.to(device)
    cfg = cfg.model_copy(update={"model": model.cfg})  # the resolved architecture is saved
    runs.write_config(run, cfg)
    tok_path = run_dir / "tokenizer.json"
    save_tokenizer(tok, tok_path)
    eos, pad = model.cfg.eos_id, model.cfg.pad_id
    if model.cfg.style == "bart" and model.cfg.context_length < cfg.max_source_tokens:
        raise ConfigError(
            f"max_source_tokens ({cfg.max_source_tokens}) exceeds the model's learned "
            f"positions (model.context_length {model.cfg.context_length}); lower it"
        )
    noise = _noise(cfg, tok, eos)
    train = _encode(tok, train_pairs, cfg, eos)
    val_pairs = val_pairs[: cfg.eval_examples]
    val = _encode(tok, val_pairs, cfg, eos)
    refs = [t for _, t in val_pairs]
    max_new = cfg.max_target_tokens
    if noise is not None:  # texts without their eos (the objective adds it back), ≥ 2 tokens
        train = [(s[:-1], s[:-1]) for s, _ in train if len(s) > 2]
        rng = np.random.default_rng([cfg.train.seed, 1])  # the same val corruption every time
        val = [noise(s[:-1], rng) for s, _ in val if len(s) > 2]
        refs = [tok.decode(t[:-1], skip_special_tokens=False).strip() for _, t in val]
        max_new = max(cfg.max_source_tokens, cfg.max_target_tokens)
        if not train or not val:
            raise DataError(f"{cfg.train_file}: no text of at least 2 tokens to corrupt")
    (run_dir / "data").mkdir(exist_ok=True)
    with (run_dir / "data" / "val.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"source": s, "target": t}) + "\n" for s, t in val_pairs)
    log.info(
        "%s-style model: %.2fM parameters; %d train / %d val pairs",
        model.cfg.style,
        model.num_params() / 1e6,
        len(train),
        len(val),
    )

    keep = noise is not None

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return score(m, tok, val, refs, max_new, cfg.eval_batch_size, device, keep)[0]

    before = evaluate(model)
    log.info("before training: %s", before)
    start = model.cfg.decoder_start_id
    batches = PairBatches(train, cfg.train.batch_size, pad, start, cfg.train.seed, noise)
    result = fit(
        model,
        build_optimizer(model, cfg.optim),
        batches,
        cfg.train,
        peak_lr=cfg.optim.lr,
        sched=cfg.sched,
        run_dir=run_dir,
        device=device,
        checkpoint_files={"config.yaml": to_yaml(cfg), "tokenizer.json": tok_path},
        loss_fn=token_loss_sum,  # summed CE over the target tokens (labels != -100)
        evaluate=evaluate,
        monitor="val_chrf",
        monitor_mode="max",
    )
    after, predictions = score(model, tok, val, refs, max_new, cfg.eval_batch_size, device, keep)
    sources = [s for s, _ in val_pairs[:5]]
    if keep:  # the corrupted texts the model saw
        sources = [tok.decode(s[:-1], skip_special_tokens=False) for s, _ in val[:5]]
    examples = [
        {"source": s, "target": t, "prediction": p}
        for s, t, p in zip(sources, refs[:5], predictions[:5], strict=True)
    ]
    summary = {
        "run_dir": str(run_dir),
        "init": cfg.init,
        "objective": cfg.objective,
        "style": model.cfg.style,
        "parameters": model.num_params(),
        "train_pairs": len(train),
        "val_pairs": len(val),
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "before": before,
        "after": after,
        "examples": examples,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "train_seconds": result.train_seconds,
        "wall_seconds": run.elapsed(),
    }
    return runs.finish(run, summary)


def print_summary(summary: dict[str, Any]) -> None:
    """Before/after table and a few examples, for the terminal."""
    keys = ("val_exact_match", "val_bleu", "val_chrf", "val_rougeL")
    print(f"{'metric':<18}{'before':>10}{'after':>10}")
    for k in keys:
        print(f"{k:<18}{summary['before'][k]:>10.3f}{summary['after'][k]:>10.3f}")
    for ex in summary["examples"]:
        print(f"  {ex['source']!r} → {ex['prediction']!r} (reference {ex['target']!r})")
    print(f"run folder: {summary['run_dir']}  ({summary['wall_seconds']:.0f} s)")
