"""Parameter counts by role, from the model config alone: all of them, the adapters', and which
ones train (and so get gradients and optimizer states) under each fine-tuning method."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.models.decoder import DecoderConfig
from lmforge.plan.workload import Workload


@dataclass(frozen=True)
class ParamCounts:
    """Parameters (elements, not bytes) of a decoder by role."""

    embedding: int  # token (+ learned position) embeddings
    head: int  # untied output head (0 when tied)
    per_layer_linear: dict[str, int]  # q k v o gate up down fc weights (+ biases), one block
    per_layer_other: int  # the two norms of one block
    final_norm: int
    n_layer: int

    @property
    def linear_per_layer(self) -> int:
        """All linear weights (+ biases) of one block."""
        return sum(self.per_layer_linear.values())

    @property
    def layer(self) -> int:
        """One block."""
        return self.linear_per_layer + self.per_layer_other

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.n_layer * self.layer + self.final_norm


def count_params(cfg: DecoderConfig) -> ParamCounts:
    """Parameters by role, computed from the config (equal to ``Decoder.num_params``)."""
    d_model, d_ff, vocab = cfg.d_model, cfg.ff_width, cfg.vocab_size or 0
    kv_dim = cfg.kv_heads * (d_model // cfg.n_head)  # k and v widths (GQA: fewer heads)
    bias, qkv_bias, mlp_bias = int(bool(cfg.bias)), int(bool(cfg.qkv_bias)), int(bool(cfg.mlp_bias))
    linear = {
        "q": d_model * d_model + qkv_bias * d_model,
        "k": d_model * kv_dim + qkv_bias * kv_dim,
        "v": d_model * kv_dim + qkv_bias * kv_dim,
        "o": d_model * d_model + bias * d_model,
    }
    if cfg.mlp == "swiglu":
        linear["gate"] = d_model * d_ff + mlp_bias * d_ff
        linear["up"] = d_model * d_ff + mlp_bias * d_ff
    else:
        linear["fc"] = d_model * d_ff + mlp_bias * d_ff
    linear["down"] = d_ff * d_model + mlp_bias * d_model
    norm = d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)  # weight (+ bias)
    positions = cfg.context_length * d_model if cfg.positions == "learned" else 0
    head = 0 if cfg.tie_embeddings else vocab * d_model
    return ParamCounts(vocab * d_model + positions, head, linear, 2 * norm, norm, cfg.n_layer)


def adapter_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one block an adapter can target."""
    d_model, d_ff = cfg.d_model, cfg.ff_width
    kv_dim = cfg.kv_heads * (d_model // cfg.n_head)
    shapes = {
        "q": (d_model, d_model), "k": (d_model, kv_dim), "v": (d_model, kv_dim),
        "o": (d_model, d_model), "qkv": (d_model, d_model + 2 * kv_dim),
        "gate": (d_model, d_ff), "up": (d_model, d_ff), "fc": (d_model, d_ff),
        "down": (d_ff, d_model),
    }  # fmt: skip
    present = set(count_params(cfg).per_layer_linear) | {"qkv"}  # fc or gate/up, by MLP type
    return {name: shape for name, shape in shapes.items() if name in present}


def lora_params(cfg: DecoderConfig, w: Workload) -> int:
    """Adapter parameters: rank x (in + out) per targeted linear per layer (+ the head if
    targeted); DoRA adds a magnitude per output feature."""
    dora = w.method == "dora"
    per_layer = sum(
        w.lora_rank * (n_in + n_out) + dora * n_out
        for name, (n_in, n_out) in adapter_shapes(cfg).items()
        if name in w.lora_targets
    )
    vocab = cfg.vocab_size or 0
    head = w.lora_rank * (cfg.d_model + vocab) + dora * vocab if "head" in w.lora_targets else 0
    return cfg.n_layer * per_layer + head


def trained_blocks(cfg: DecoderConfig, w: Workload) -> int:
    """How many blocks (the top ones) have all their weights trained."""
    if w.method == "freeze" and w.train_blocks is not None:
        return min(w.train_blocks, cfg.n_layer)
    return cfg.n_layer if w.method in ("full", "freeze") else 0


def trainable_params(cfg: DecoderConfig, w: Workload) -> int:
    """Parameters with gradients and optimizer states: all (full), the adapters (lora, dora,
    qlora), or for freeze the top ``train_blocks`` blocks (+ every norm, + embeddings/head)."""
    counts = count_params(cfg)
    if w.method == "full":
        return counts.total
    if w.method != "freeze":
        return lora_params(cfg, w)
    top = trained_blocks(cfg, w)
    n = top * counts.layer
    if w.train_norms:
        n += (counts.n_layer - top) * counts.per_layer_other + counts.final_norm
    if w.train_embeddings:
        n += counts.embedding + counts.head
    return n


def head_trained(w: Workload) -> bool:
    """The output head's full weight gets a gradient."""
    return w.method == "full" or (w.method == "freeze" and w.train_embeddings)


def head_needs_input(w: Workload) -> bool:
    """The head's input (the final norm's output) is saved for a weight gradient: the head
    trains, or carries a LoRA adapter."""
    return head_trained(w) or (w.method != "freeze" and "head" in w.lora_targets)
