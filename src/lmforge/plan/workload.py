"""What a memory estimate describes: one training (or inference) setup — and, kept apart, how
another library's training loop differs from lmforge's, for comparing with its published figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Method = Literal["full", "lora", "dora", "qlora", "freeze"]  # as lmforge finetune's methods
Optimizer = Literal["adamw", "adam", "sgd", "adamw8bit", "adagrad", "rmsprop", "none"]
MIXED_PRECISIONS = ("bf16-mixed", "fp16-mixed")  # autocast: 16-bit matmuls over fp32 weights


@dataclass(frozen=True)
class Workload:
    """One setup on one device: shapes, precision, what trains, optimizer, checkpointing and
    data parallelism — everything lmforge's own configs decide."""

    batch: int = 1  # sequences per micro-batch (per device)
    seq: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16-mixed | fp16-mixed | bf16 (pure: weights in bf16)
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9  # sgd / rmsprop: a momentum buffer exists when > 0
    method: Method = "full"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")  # of q k v qkv(fused) o gate up down fc head
    lora_dropout: float = 0.0
    qlora_double_quant: bool = False  # NF4 scales quantised too
    train_blocks: int | None = None  # freeze: only the top k blocks train (None = all)
    train_norms: bool = True  # freeze: every norm trains too (as models/lora.py freeze)
    train_embeddings: bool = False  # freeze: embeddings and head train too
    checkpointing: Literal["none", "selective", "full"] = "none"
    device: Literal["cpu", "cuda"] = "cpu"
    attention: Literal["auto", "sdpa", "eager"] = "auto"  # auto: as lmforge's ``attend`` picks
    world_size: int = 1  # data-parallel devices
    sharding: Literal["none", "zero1", "zero2", "zero3"] = "none"  # zero3 = FSDP full shard
    inference: bool = False  # weights + KV cache + prefill logits instead of a training step

    @property
    def mixed(self) -> bool:
        """Autocast: matmuls in 16 bit over fp32 weights."""
        return self.precision in MIXED_PRECISIONS

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch (batch x seq)."""
        return self.batch * self.seq


@dataclass(frozen=True)
class PeerPractice:
    """How another library's training loop treats the loss, the logits, the optimizer and QLoRA
    where lmforge's does otherwise. The defaults are lmforge's own practice
    (``LMFORGE_PRACTICE``); the rest exists to compare with figures litgpt and torchtune publish
    (``tests/plan/test_estimate.py``) and for ``lmforge estimate --loss_chunks``."""

    loss_upcast: bool = False  # 16-bit logits upcast to fp32 for F.cross_entropy (litgpt,
    # torchtune); lmforge's ``token_loss_sum`` works on the 16-bit logits in fp32 row chunks
    loss_chunks: int = 1  # upcast cross-entropy computed in this many chunks (litgpt, torchtune)
    loss_fused: bool = False  # chunks upcast and reduced one at a time (compiled, torchtune)
    logits_in_backward: bool = False  # the loop holds the logits in backward (litgpt); lmforge
    # and torchtune drop them once the loss is computed
    optimizer_in_backward: bool = False  # each gradient applied and freed as it is produced
    paged_optimizer: bool = False  # bitsandbytes paged states: managed memory, off the allocator
    quantize_head: bool = False  # QLoRA also quantises the output head (litgpt's bnb plugin)
    lean_lora_blocks: bool = True  # lmforge: a LoRA block rebuilds its norm outputs in backward
    # and its SwiGLU down adapter forms silu(gate)·up itself (models/fused_lora.py); peers
    # (peft, litgpt, torchtune) keep both

    @property
    def upcasts_logits(self) -> bool:
        """16-bit logits reach the loss as fp32 (implied by a chunked or fused loss)."""
        return self.loss_upcast or self.loss_chunks > 1 or self.loss_fused


LMFORGE_PRACTICE = PeerPractice()


# lmforge's linear modules (``models/lora.py`` target names) → the estimator's linear names.
# A target matches a module as peft matches it: the whole name or a "."-suffix ("proj" = both
# attn.proj and mlp.proj). The estimator's own names (q k v separately: other libraries' layouts,
# e.g. litgpt's LoRA on q and v) are accepted as they are. The one mapping between the two.
LORA_MODULE_TERMS = {
    "attn.qkv": "qkv", "attn.proj": "o", "mlp.gate": "gate", "mlp.up": "up", "mlp.fc": "fc",
    "mlp.proj": "down", "lm_head": "head",
}  # fmt: skip
LORA_TERMS = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc", "head")


def lora_terms(targets: Iterable[str]) -> tuple[str, ...]:
    """LoRA targets as lmforge module names (``attn.qkv``, ``mlp.proj``, ``proj``) or estimator
    names (``q``, ``v``, ``down``) → estimator names, in order, without repeats."""
    out: list[str] = []
    for target in targets:
        if target in LORA_TERMS:
            hits = [target]
        else:
            hits = [
                term
                for module, term in LORA_MODULE_TERMS.items()
                if module == target or module.endswith("." + target)
            ]
        if not hits:
            raise ValueError(
                f"LoRA target {target!r} is neither an lmforge module name "
                f"({', '.join(LORA_MODULE_TERMS)}, or a suffix of one) nor one of "
                f"{' '.join(LORA_TERMS)}"
            )
        out += [h for h in hits if h not in out]
    return tuple(out)
