"""The small base ``lmforge finetune`` pretrains first when no ``base`` is given.

A tiny Llama-style model trained with ``lmforge pretrain`` on the instruction suite's tasks
written as plain text, in ``<run folder>/base`` (reused when the run is resumed).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from lmforge.atomic import atomic_write_text
from lmforge.config import Section
from lmforge.data.instructions import FAMILIES, as_plain_text, make_suite
from lmforge.data.tokenizer import EOS
from lmforge.train import distributed

if TYPE_CHECKING:
    from lmforge.recipes.finetune import FinetuneConfig

log = logging.getLogger(__name__)


class DemoBaseConfig(Section):
    """The small base ``finetune`` pretrains first when no ``base`` is given."""

    steps: int = Field(1500, gt=0, description="pretraining steps on the suite's plain text")
    n_per_family: int = Field(3000, gt=0, description="plain-text examples per family")
    families: list[str] | None = Field(
        None, description="families in the pretraining text; null = suite.families"
    )
    # The model it pretrains and its tokenizer's size: fixed, not options; here (not in a
    # module constant) so that ``lmforge estimate`` reads them from the config it parses.
    MODEL: ClassVar[dict[str, Any]] = dict(
        arch="llama", context_length=96, n_layer=4, n_head=4, d_model=128, tie_embeddings=True
    )
    VOCAB_SIZE: ClassVar[int] = 512


def demo_base(run_dir: Path, cfg: FinetuneConfig) -> Path:
    """Pretrain a tiny Llama-style model on the suite's tasks written as plain text lines
    (``reverse: c a t = t a c``), mixed with chat-formatted examples of the *other* families.
    It knows the tasks and it knows the chat format, but has never seen these tasks asked in a
    chat: what an instruction tune teaches a real base model (without chat examples a 1M model
    spends the whole fine-tune learning the template's bytes; measured: 3 % exact match)."""
    from lmforge.recipes.pretrain import PretrainConfig, pretrain

    base_dir = run_dir / "base"
    if (base_dir / "checkpoints" / "latest").exists():
        return base_dir
    text_path = run_dir / "base_text.txt"
    families = cfg.demo_base.families or cfg.suite.families
    examples = make_suite(families, cfg.demo_base.n_per_family, seed=cfg.suite.seed + 1)
    units = as_plain_text(examples).splitlines(keepends=True)
    others = [f for f in FAMILIES if f not in set(families) | set(cfg.suite.families)]
    for ex in make_suite(others, cfg.demo_base.n_per_family // 2, seed=cfg.suite.seed + 2):
        # ChatML as ChatFormat.chatml renders it for lmforge's tokenizer (EOS ends a turn)
        units.append(
            f"<|im_start|>user\n{ex['prompt']}{EOS}\n<|im_start|>assistant\n{ex['answer']}{EOS}\n"
        )
    random.Random(cfg.suite.seed + 3).shuffle(units)  # the val split is the text's last 10 %
    if not distributed.launched() or int(os.environ["RANK"]) == 0:
        atomic_write_text(text_path, "".join(units))
    log.info("no base given: pretraining a small demo base on %s first", text_path)
    pcfg = PretrainConfig.model_validate(
        dict(
            data=dict(
                path=str(text_path),
                vocab_size=DemoBaseConfig.VOCAB_SIZE,
                near_dedup=False,
                dedup=False,
                num_workers=1,
            ),
            model=DemoBaseConfig.MODEL,
            train=dict(
                max_steps=cfg.demo_base.steps,
                batch_size=16,
                eval_every=cfg.demo_base.steps,
                save_every=cfg.demo_base.steps,
                precision="auto",
                num_threads=cfg.train.num_threads,
                log_every=50,
            ),
            optim=dict(lr=3e-3, weight_decay=0.1),
            sched=dict(warmup_steps=min(20, cfg.demo_base.steps // 10)),
            sample=dict(prompt="reverse: a b c =", max_new_tokens=8, temperature=0.0),
            out_dir=str(base_dir),
        )
    )
    pretrain(pcfg)
    return base_dir
