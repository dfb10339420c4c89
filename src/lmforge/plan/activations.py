"""Activation bytes: what autograd saves for backward, tensor by tensor, as lmforge's own layers
(``models/layers.py``) keep them — per block, under each checkpointing mode, and at model level.

All sizes are bytes for one micro-batch of ``Workload.tokens`` (batch x seq) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmforge.models.decoder import DecoderConfig
from lmforge.plan.params import adapter_shapes, count_params, head_needs_input, trained_blocks
from lmforge.plan.workload import Workload


@dataclass(frozen=True)
class TensorWidths:
    """Bytes per element of a step's tensors, by role (fp32: 4/4/4; autocast: 2/4/2; bf16: 2/2/2)."""

    matmul_output: int  # outputs of linears and attention
    residual: int  # the residual stream and the norms
    saved_input: int  # a linear's input, saved for its weight gradient


def param_bytes(w: Workload) -> int:
    """Bytes per weight, gradient and optimizer-state element: 2 in pure bf16, else fp32 4
    (autocast keeps fp32 master weights; adapters take the base's dtype, as litgpt/torchtune)."""
    return 2 if w.precision == "bf16" else 4


def tensor_widths(w: Workload) -> TensorWidths:
    if w.mixed:
        return TensorWidths(2, 4, 2)  # matmuls in 16 bit, residual stream and norms in fp32
    if param_bytes(w) == 2:
        return TensorWidths(2, 2, 2)
    return TensorWidths(4, 4, 4)


def attention_kernel(w: Workload) -> str:
    """Which attention path runs: lmforge's ``attend`` uses matmul-softmax-matmul for bf16 on
    CPU and SDPA otherwise."""
    if w.attention != "auto":
        return w.attention
    if w.device == "cpu" and w.precision in ("bf16-mixed", "bf16"):
        return "eager"
    return "sdpa"


def _kernel_with_dropout(cfg: DecoderConfig, w: Workload) -> str:
    """SDPA on CPU with dropout falls back to the math kernel, which saves what eager saves."""
    kernel = attention_kernel(w)
    if cfg.dropout > 0 and kernel == "sdpa" and w.device == "cpu":
        return "math"
    return kernel


def _dropout_mask_bytes(w: Workload) -> int:
    """Bytes per element of a dropout mask: CPU keeps it in the input dtype, CUDA in one byte."""
    return tensor_widths(w).matmul_output if w.device == "cpu" else 1


def block_activation_terms(
    cfg: DecoderConfig, w: Workload, lean_lora: bool = True
) -> dict[str, float]:
    """Bytes one block saves for backward per micro-batch, by term.

    ``w.method`` decides what a frozen linear (LoRA base) no longer needs: a linear whose
    weight is frozen needs only its weight for the input gradient, not its input.
    ``lean_lora`` (lmforge's adapters, ``PeerPractice.lean_lora_blocks``): without
    checkpointing or autocast the norm outputs are rebuilt in backward (``Block.forward``), and
    a plain LoRA on the SwiGLU down projection without dropout saves only gate and up
    (``models/fused_lora.SwiGLUDownLora``).
    """
    n_tok, d_model, d_ff = w.tokens, cfg.d_model, cfg.ff_width
    batch, seq, n_head = w.batch, w.seq, cfg.n_head
    head_dim = d_model // n_head
    kv_dim = cfg.kv_heads * head_dim
    width = tensor_widths(w)
    out_b, cast_b = width.matmul_output, width.saved_input
    kernel = _kernel_with_dropout(cfg, w)
    dropout = cfg.dropout > 0
    mask_b = _dropout_mask_bytes(w)
    full = w.method == "full"
    adapted = set(w.lora_targets) if not full else set()
    if "qkv" in adapted:  # lmforge's fused projection: one adapter for q, k and v
        adapted |= {"q", "k", "v"}

    def input_saved(*linears: str) -> bool:  # the input of these linears is kept
        return full or bool(adapted & set(linears))

    lean = lean_lora and w.method == "lora"
    rebuilt_norms = lean and not w.mixed and w.checkpointing == "none"
    fused_down = lean and w.lora_dropout == 0 and "down" in adapted

    terms: dict[str, float] = {}
    terms["residual stream (block input, mid)"] = 2 * n_tok * d_model * width.residual
    mlp_in = ("gate", "up") if cfg.mlp == "swiglu" else ("fc",)
    norm_outputs = input_saved("q", "k", "v") + input_saved(*mlp_in)
    if not rebuilt_norms:
        terms["norm outputs (linear inputs)"] = n_tok * d_model * cast_b * norm_outputs
    stats = 2 if cfg.norm == "layernorm" else 1  # (mean, rstd) or rstd per norm
    stat_b = 2 if w.precision == "bf16" and cfg.norm == "layernorm" else 4
    terms["norm statistics"] = 2 * stats * n_tok * stat_b
    if cfg.norm == "rmsnorm" and w.precision != "fp32":  # fp32 upcast inside the norm is saved
        terms["rmsnorm fp32 internals"] = n_tok * d_model * 4 * (2 if w.mixed else 4)
    rope = cfg.positions == "rope"
    if kernel == "sdpa":
        terms["q, k, v"] = n_tok * (d_model + 2 * kv_dim) * out_b
        if rope:  # rotated halves and rotated q/k (measured on CPU; CUDA keeps k un-expanded)
            rotated = (3 * d_model + kv_dim) if w.device == "cpu" else (2 * d_model + 2 * kv_dim)
            terms["rope"] = n_tok * out_b * rotated
        terms["attention output"] = n_tok * d_model * out_b
        terms["attention logsumexp"] = n_tok * n_head * 4
    else:  # eager / math: q, k, v are copied (k and v expanded to every query head)
        terms["q, k, v copies"] = n_tok * out_b * (4 * d_model if rope else 3 * d_model)
        scores = batch * n_head * seq * seq  # (B, heads, T, T)
        terms["attention probabilities"] = scores * out_b  # one tensor: softmax out = bmm in
        if dropout:
            terms["attention dropout"] = scores * (mask_b + out_b)
        terms["attention output"] = n_tok * d_model * out_b * input_saved("o")
        terms["causal mask"] = seq * seq
        if rope and w.mixed:
            terms["rope cos/sin casts"] = 4 * seq * head_dim * 2
    if dropout:
        terms["residual dropout masks"] = 2 * n_tok * d_model * mask_b
    if cfg.mlp == "swiglu" and fused_down:
        terms["mlp gate, up"] = 2 * n_tok * d_ff * out_b
    elif cfg.mlp == "swiglu":
        terms["mlp gate, silu, up"] = 3 * n_tok * d_ff * out_b
        terms["mlp product (down input)"] = n_tok * d_ff * out_b * input_saved("down")
    else:
        terms["mlp fc output"] = n_tok * d_ff * out_b
        terms["mlp gelu output (proj input)"] = n_tok * d_ff * out_b * input_saved("down")
    if adapted:
        n_adapters = sum(1 for t in w.lora_targets if t != "head")
        terms["lora A outputs"] = n_adapters * n_tok * w.lora_rank * out_b
        if w.lora_dropout > 0:
            terms["lora dropout"] = n_adapters * n_tok * d_model * (out_b + mask_b)
    return terms


def down_projection_input(terms: dict[str, float]) -> float:
    """The MLP's last activation (the down projection's input) among ``terms``: backward frees
    it first, before the hidden-width activation gradients appear."""
    return terms.get("mlp product (down input)", 0) + terms.get("mlp gelu output (proj input)", 0)


def selective_activation_terms(cfg: DecoderConfig, w: Workload) -> tuple[dict[str, float], float]:
    """Bytes one block keeps under selective checkpointing (``models/activation_checkpointing``):
    its input and the outputs of its matmuls and attention kernel; everything pointwise is rebuilt
    in backward. Also returns how many of these bytes no checkpointing would not keep (outputs
    that backward does not need: the o and down projections', the eager attention's two bmm
    outputs, LoRA B's), which the recompute of a block adds to its usual activations.
    """
    n_tok, d_model, d_ff = w.tokens, cfg.d_model, cfg.ff_width
    n_head = cfg.n_head
    kv_dim = cfg.kv_heads * (d_model // n_head)
    width = tensor_widths(w)
    out_b = width.matmul_output
    kernel = _kernel_with_dropout(cfg, w)  # SDPA's math fallback saves its two bmm, as eager
    terms: dict[str, float] = {
        "block input": n_tok * d_model * width.residual,
        "qkv output": n_tok * (d_model + 2 * kv_dim) * out_b,
    }
    not_needed = {"o output": n_tok * d_model * out_b, "down output": n_tok * d_model * out_b}
    if kernel == "sdpa":
        if not cfg.dropout > 0:  # a fused kernel with dropout draws random numbers: recomputed
            terms["attention output, logsumexp"] = n_tok * d_model * out_b + n_tok * n_head * 4
    else:  # scores q·kᵀ and probabilities·v (the softmax and its casts are recomputed)
        not_needed["attention scores"] = w.batch * n_head * w.seq * w.seq * out_b
        not_needed["attention bmm output"] = n_tok * d_model * out_b
    if cfg.mlp == "swiglu":
        terms["mlp gate, up outputs"] = 2 * n_tok * d_ff * out_b
    else:
        terms["mlp fc output"] = n_tok * d_ff * out_b
    if w.method != "full":  # each adapter: A's output (saved anyway) and B's
        widths = {"q": d_model, "k": kv_dim, "v": kv_dim, "qkv": d_model + 2 * kv_dim}
        widths |= {"o": d_model, "gate": d_ff, "up": d_ff, "fc": d_ff, "down": d_model}
        targets = [t for t in w.lora_targets if t in widths]
        terms["lora A outputs"] = len(targets) * n_tok * w.lora_rank * out_b
        not_needed["lora B outputs"] = sum(n_tok * widths[t] * out_b for t in targets)
    return terms | not_needed, sum(not_needed.values())


def costliest_block_workload(w: Workload) -> Workload:
    """The workload of the most expensive block, as ``block_activation_terms`` knows methods:
    a trained block of a freeze is a full fine-tune's (DoRA is LoRA there, plus
    ``all_blocks``' extra term)."""
    return replace(w, method="full") if w.method == "freeze" else w


def all_blocks(cfg: DecoderConfig, w: Workload, per_layer: float) -> float:
    """Saved activations of all blocks without checkpointing, given one block's ``per_layer``
    (of ``costliest_block_workload``).

    freeze: trained blocks save what a full fine-tune saves; a frozen block below them saves
    only what the gradient needs to pass through it (no linear inputs), and nothing when no
    gradient flows that far (norms and embeddings frozen too). DoRA (measured, peft 0.21): each
    adapted linear also keeps its base output and its adapter output, tokens x out each, for the
    magnitude's gradient.
    """
    n_layer = cfg.n_layer
    if w.method == "freeze":
        top = trained_blocks(cfg, w)
        frozen_block = 0.0
        if w.train_norms or w.train_embeddings:
            pass_through = replace(w, method="lora", lora_targets=())
            frozen_block = sum(block_activation_terms(cfg, pass_through).values())
        return top * per_layer + (n_layer - top) * frozen_block
    total = n_layer * per_layer
    if w.method == "dora":
        out_b = tensor_widths(w).matmul_output
        outs = sum(o for t, (_, o) in adapter_shapes(cfg).items() if t in w.lora_targets)
        total += n_layer * 2 * w.tokens * outs * out_b
    return total


def model_level_activations(cfg: DecoderConfig, w: Workload) -> float:
    """Bytes saved outside the blocks: the final norm's input and (when the head needs it) its
    output, RMSNorm's fp32 internals in 16-bit precisions, the embedding dropout mask."""
    n_tok, d_model = w.tokens, cfg.d_model
    width = tensor_widths(w)
    saved = n_tok * d_model * width.residual
    saved += n_tok * d_model * width.saved_input * head_needs_input(w)
    if cfg.norm == "rmsnorm" and w.precision != "fp32":
        saved += n_tok * d_model * 4 * (1 if w.mixed else 2)
    if cfg.dropout > 0:
        saved += n_tok * d_model * _dropout_mask_bytes(w)
    return saved


def autocast_weight_copies(cfg: DecoderConfig, w: Workload) -> int:
    """Bytes of the 16-bit weight copies autocast caches through backward (0 without autocast).

    No checkpointing: every matmul weight's (the head's too, even when tied) except QLoRA's
    (its NF4 base is dequantised per op); a freeze with no gradient below its trained blocks
    does not keep the frozen blocks' casts. Selective or full checkpointing recomputes the
    blocks' casts, so only the head's outlives the forward."""
    if not w.mixed:
        return 0
    counts = count_params(cfg)
    head = cfg.vocab_size * cfg.d_model if cfg.vocab_size else 0
    if w.checkpointing != "none":
        return 2 * head
    if w.method == "qlora":
        return 0
    copies = 2 * (cfg.n_layer * counts.linear_per_layer + head)
    if w.method == "freeze" and not (w.train_norms or w.train_embeddings):
        # casts of frozen weights are not cached; with no gradient below, none is saved
        copies -= 2 * (cfg.n_layer - trained_blocks(cfg, w)) * counts.linear_per_layer
    return copies


def block_weight_copies(cfg: DecoderConfig, w: Workload) -> int:
    """Bytes of one block's 16-bit weight casts made again when backward reaches it (autocast;
    under checkpointing also for QLoRA, whose recompute dequantises and casts)."""
    if w.mixed and (w.checkpointing != "none" or w.method != "qlora"):
        return 2 * count_params(cfg).linear_per_layer
    return 0
