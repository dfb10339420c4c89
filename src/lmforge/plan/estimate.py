"""Predict the peak memory of a training step (and of inference) from the config alone.

The model is built on the meta device (no weights), its parameters are counted by role, and the
activations saved for backward are summed tensor by tensor, the way autograd keeps them in
lmforge's own layers (``models/layers.py``). Every term is named so that the breakdown explains
the peak; docs/memory.md lists the terms, where each comes from and how it was checked.

Peak of a steady-state step (step >= 2: the optimizer states exist) is the largest of
  forward/backward: weights + optimizer + (gradients if accumulating) + saved activations
                    + the loss's vocabulary-sized tensors at the start of backward (where the
                    peak usually falls): fp32 logits — the fp32 log-softmax and two fp32
                    gradients; 16-bit logits — the logits, their 16-bit gradient and one fp32
                    chunk (lmforge's ``token_loss_sum``), or the upcast path's fp32 tensors
                    (``Workload.loss_upcast``: litgpt, torchtune)
  recompute (selective or full activation checkpointing): one block's activations rebuilt in
                    backward
  optimizer step:   weights + gradients + optimizer states
All byte counts are exact sizes of tensors; CUDA adds its context and allocator slack outside
``torch.cuda.max_memory_allocated`` (``CUDA_CONTEXT_BYTES``), reported separately.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from lmforge.models.decoder import DecoderConfig, loss_chunk_rows
from lmforge.train.device import GPU_PEAK_FLOPS

GiB = 2**30

# ---- named constants (values and sources in docs/memory.md) ----------------------------------
# CUDA context + cuBLAS/cuDNN workspaces, outside the caching allocator: typically 0.3-1 GiB
# (PyTorch "CUDA semantics" notes; nvidia-smi minus max_memory_reserved on A100/H100).
CUDA_CONTEXT_BYTES = 600 * 2**20
# NCCL communicator buffers per process: NCCL_BUFFSIZE (default 4 MiB) x channels (up to 32)
# x 2 directions for a ring; ~256 MiB is what nvidia-smi shows per rank on 8-GPU nodes.
NCCL_BUFFER_BYTES = 256 * 2**20
# The caching allocator rounds blocks and fragments: reserved / allocated is ~1.05-1.15 in
# training; the planner's safety margin covers it.
ALLOCATOR_SLACK = 0.05
# QLoRA NF4 storage: 4 bits + one fp32 absmax per 64 weights (bitsandbytes blocksize 64), or
# with double quantisation an 8-bit absmax per 64 + one fp32 per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
NF4_DQ_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# name: (memory bytes, dense bf16 FLOP/s, dense fp32 FLOP/s); FLOP/s from train/device.py
GPUS: dict[str, tuple[int, float, float]] = {
    "RTX 4090": (24 * GiB, *GPU_PEAK_FLOPS["RTX 4090"]),
    "A100 40GB": (40 * GiB, *GPU_PEAK_FLOPS["A100"]),
    "A100 80GB": (80 * GiB, *GPU_PEAK_FLOPS["A100"]),
    "H100 80GB": (80 * GiB, *GPU_PEAK_FLOPS["H100"]),
    "H200 141GB": (141 * 10**9, *GPU_PEAK_FLOPS["H200"]),
}
DEFAULT_MFU = 0.40  # assumed model FLOPs utilisation when none was measured

Method = Literal["full", "lora", "dora", "qlora", "freeze"]  # as lmforge finetune's methods
Optimizer = Literal["adamw", "adam", "sgd", "adamw8bit", "adagrad", "rmsprop", "none"]


@dataclass(frozen=True)
class Workload:
    """What runs: shapes, precision, method, optimizer and parallelism."""

    batch: int = 1  # sequences per micro-batch (per device)
    seq: int = 256  # tokens per sequence
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16-mixed | fp16-mixed | bf16
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9  # sgd / rmsprop
    method: Method = "full"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")  # of q k v qkv(fused) o gate up down fc head
    lora_dropout: float = 0.0
    qlora_double_quant: bool = False
    train_blocks: int | None = None  # freeze: only the top k blocks train (None = all)
    train_norms: bool = True  # freeze: every norm trains too (as models/lora.py freeze)
    train_embeddings: bool = False  # freeze: embeddings and head train too
    checkpointing: Literal["none", "selective", "full"] = "none"
    device: Literal["cpu", "cuda"] = "cpu"
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    loss_upcast: bool = False  # 16-bit logits upcast to fp32 for F.cross_entropy (litgpt,
    # torchtune; implied by loss_chunks > 1 or loss_fused); False: lmforge's token_loss_sum
    loss_chunks: int = 1  # upcast cross-entropy computed in this many chunks (litgpt, torchtune)
    loss_fused: bool = False  # chunks upcast and reduced one at a time (compiled, torchtune)
    logits_in_backward: bool = False  # the loop holds the logits in backward (litgpt); lmforge
    # and torchtune drop them once the loss is computed
    optimizer_in_backward: bool = False  # each gradient applied and freed as it is produced
    paged_optimizer: bool = (
        False  # bitsandbytes paged states: managed memory, outside the allocator
    )
    quantize_head: bool = False  # QLoRA also quantises the output head (litgpt's bnb plugin)
    world_size: int = 1
    sharding: Literal["none", "zero1", "zero2", "zero3"] = "none"  # zero3 = FSDP full shard
    inference: bool = False


@dataclass
class Estimate:
    """Predicted bytes by component; ``peak`` is what ``max_memory_allocated`` would show."""

    components: dict[str, float]
    peak: float
    phase: str  # where the peak falls
    per_layer_activation: float
    runtime_overhead: float = 0.0  # CUDA context, NCCL: outside the allocator
    cpu_load_peak: float = 0.0
    notes: list[str] = field(default_factory=list)
    all_components: dict[str, float] = field(default_factory=dict)  # each at full size

    def to_dict(self) -> dict:
        return asdict(self)


# ---- parameter counts by role ---------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token (+ position) embeddings
    head: int  # untied output head (0 when tied)
    per_layer_linear: dict[str, int]  # q k v o gate up down fc proj weights (+ biases)
    per_layer_other: int  # norms
    final_norm: int
    n_layer: int

    @property
    def layer(self) -> int:
        return sum(self.per_layer_linear.values()) + self.per_layer_other

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.n_layer * self.layer + self.final_norm


def count_params(cfg: DecoderConfig) -> ParamCounts:
    """Parameters by role, computed from the config (equal to ``Decoder.num_params``)."""
    C, F, V = cfg.d_model, cfg.ff_width, cfg.vocab_size or 0
    hd = C // cfg.n_head
    kvd = cfg.kv_heads * hd
    b, qb = int(bool(cfg.bias)), int(bool(cfg.qkv_bias))
    lin = {"q": C * C + qb * C, "k": C * kvd + qb * kvd, "v": C * kvd + qb * kvd}
    lin["o"] = C * C + b * C
    if cfg.mlp == "swiglu":
        lin |= {"gate": C * F + b * F, "up": C * F + b * F, "down": F * C + b * C}
    else:
        lin |= {"fc": C * F + b * F, "down": F * C + b * C}
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    emb = V * C + (cfg.context_length * C if cfg.positions == "learned" else 0)
    return ParamCounts(emb, 0 if cfg.tie_embeddings else V * C, lin, 2 * norm, norm, cfg.n_layer)


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
    for t in targets:
        hits = [t] if t in LORA_TERMS else [
            term for name, term in LORA_MODULE_TERMS.items() if name == t or name.endswith("." + t)
        ]  # fmt: skip
        if not hits:
            raise ValueError(
                f"LoRA target {t!r} is neither an lmforge module name "
                f"({', '.join(LORA_MODULE_TERMS)}, or a suffix of one) nor one of "
                f"{' '.join(LORA_TERMS)}"
            )
        out += [h for h in hits if h not in out]
    return tuple(out)


def _adapter_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear an adapter can target, in one block."""
    C, F = cfg.d_model, cfg.ff_width
    kvd = cfg.kv_heads * (C // cfg.n_head)
    shapes = {"q": (C, C), "k": (C, kvd), "v": (C, kvd), "o": (C, C), "qkv": (C, C + 2 * kvd)}
    shapes |= {"gate": (C, F), "up": (C, F), "fc": (C, F), "down": (F, C)}
    has = set(count_params(cfg).per_layer_linear) | {"qkv"}  # fc or gate/up, by MLP type
    return {k: v for k, v in shapes.items() if k in has}


def lora_params(cfg: DecoderConfig, w: Workload) -> int:
    """Adapter parameters: r x (in + out) per targeted linear per layer (+ head if targeted);
    DoRA adds a magnitude per output feature."""
    shapes = _adapter_shapes(cfg)
    dora = w.method == "dora"
    per_layer = sum(
        w.lora_rank * (i + o) + dora * o for t, (i, o) in shapes.items() if t in w.lora_targets
    )
    V = cfg.vocab_size or 0
    head = w.lora_rank * (cfg.d_model + V) + dora * V if "head" in w.lora_targets else 0
    return cfg.n_layer * per_layer + head


def _trained_blocks(cfg: DecoderConfig, w: Workload) -> int:
    """How many blocks (the top ones) have all their weights trained."""
    if w.method == "freeze" and w.train_blocks is not None:
        return min(w.train_blocks, cfg.n_layer)
    return cfg.n_layer if w.method in ("full", "freeze") else 0


def trainable_params(cfg: DecoderConfig, w: Workload) -> int:
    """Parameters with gradients and optimizer states: all (full), the adapters (lora, dora,
    qlora), or for freeze the top ``train_blocks`` blocks (+ every norm, + embeddings/head)."""
    pc = count_params(cfg)
    if w.method == "full":
        return pc.total
    if w.method != "freeze":
        return lora_params(cfg, w)
    k = _trained_blocks(cfg, w)
    n = k * pc.layer
    if w.train_norms:
        n += (pc.n_layer - k) * pc.per_layer_other + pc.final_norm
    if w.train_embeddings:
        n += pc.embedding + pc.head
    return n


def _head_trained(w: Workload) -> bool:
    """The output head's full weight gets a gradient."""
    return w.method == "full" or (w.method == "freeze" and w.train_embeddings)


def _block_workload(w: Workload) -> Workload:
    """The workload of the most expensive block, as ``block_activation_terms`` knows methods:
    a trained block of a freeze is a full fine-tune's; DoRA is LoRA plus ``_stacked_blocks``'s
    extra term."""
    if w.method == "freeze":
        return replace(w, method="full")
    return replace(w, method="lora") if w.method == "dora" else w


def _stacked_blocks(cfg: DecoderConfig, w: Workload, weight_bytes: int, per_layer: float) -> float:
    """Saved activations of all blocks, given one block's ``per_layer`` (of ``_block_workload``).

    freeze: trained blocks save what a full fine-tune saves; a frozen block below them saves
    only what the gradient needs to pass through it (no linear inputs), and nothing when no
    gradient flows that far (norms and embeddings frozen too). DoRA (measured, peft 0.21): each
    adapted linear also keeps its base output and its adapter output, N x out each, for the
    magnitude's gradient.
    """
    L = cfg.n_layer
    if w.method == "freeze":
        k = _trained_blocks(cfg, w)
        below = 0.0
        if w.train_norms or w.train_embeddings:
            frozen = replace(w, method="lora", lora_targets=())
            below = sum(block_activation_terms(cfg, frozen, weight_bytes).values())
        return k * per_layer + (L - k) * below
    total = L * per_layer
    if w.method == "dora":
        a = _dtypes(w, weight_bytes)[0]
        outs = sum(o for t, (_, o) in _adapter_shapes(cfg).items() if t in w.lora_targets)
        total += L * 2 * w.batch * w.seq * outs * a
    return total


# ---- dtypes -------------------------------------------------------------------------------


def _dtypes(w: Workload, weight_bytes: int) -> tuple[int, int, int]:
    """(matmul output bytes a, residual-stream bytes r, saved linear-input bytes cast)."""
    if w.precision in ("bf16-mixed", "fp16-mixed"):
        return 2, 4, 2  # autocast: matmuls in 16 bit, residual stream and norms in fp32
    if w.precision == "bf16" or weight_bytes == 2:
        return 2, 2, 2
    return 4, 4, 4


def attention_kernel(w: Workload) -> str:
    """Which attention path runs: lmforge's ``attend`` uses matmul-softmax-matmul for bf16 on
    CPU and SDPA otherwise; SDPA on CPU with dropout falls back to the math (eager) kernel."""
    if w.attention != "auto":
        return w.attention
    if w.device == "cpu" and w.precision in ("bf16-mixed", "bf16"):
        return "eager"
    return "sdpa"


# ---- activations ----------------------------------------------------------------------------


def block_activation_terms(cfg: DecoderConfig, w: Workload, weight_bytes: int) -> dict[str, float]:
    """Bytes one block saves for backward per micro-batch, by term (all B x T tokens).

    ``trainable`` decides what a frozen linear (LoRA base) no longer needs: a linear whose
    weight is frozen needs only its weight for the input gradient, not its input.
    """
    B, T, C, F = w.batch, w.seq, cfg.d_model, cfg.ff_width
    N = B * T
    nh = cfg.n_head
    hd = C // nh
    kvd = cfg.kv_heads * hd
    qkvd = C + 2 * kvd
    a, r, cast = _dtypes(w, weight_bytes)
    kernel = attention_kernel(w)
    drop = cfg.dropout > 0
    mask_b = a if w.device == "cpu" else 1  # CPU dropout keeps its mask in the input dtype
    if drop and kernel == "sdpa" and w.device == "cpu":
        kernel = "math"
    full = w.method == "full"
    lora = set(w.lora_targets) if not full else set()
    if "qkv" in lora:  # lmforge's fused projection: one adapter for q, k and v
        lora |= {"q", "k", "v"}

    def needs(*linears: str) -> bool:  # the input of these linears is saved
        return full or bool(lora & set(linears))

    t: dict[str, float] = {}
    t["residual stream (block input, mid)"] = 2 * N * C * r
    mlp_in = ("gate", "up") if cfg.mlp == "swiglu" else ("fc",)
    t["norm outputs (linear inputs)"] = N * C * cast * (needs("q", "k", "v") + needs(*mlp_in))
    stats = 2 if cfg.norm == "layernorm" else 1  # (mean, rstd) or rstd per norm
    t["norm statistics"] = (
        2 * stats * N * (2 if w.precision == "bf16" and cfg.norm == "layernorm" else 4)
    )
    if cfg.norm == "rmsnorm" and w.precision != "fp32":  # fp32 upcast inside the norm is saved
        t["rmsnorm fp32 internals"] = (
            N * C * 4 * (2 if w.precision in ("bf16-mixed", "fp16-mixed") else 4)
        )
    rope = cfg.positions == "rope"
    if kernel == "sdpa":
        t["q, k, v"] = N * qkvd * a
        if rope:  # rotated halves and rotated q/k (measured on CPU; CUDA keeps k un-expanded)
            t["rope"] = N * a * ((3 * C + kvd) if w.device == "cpu" else (2 * C + 2 * kvd))
        t["attention output"] = N * C * a
        t["attention logsumexp"] = N * nh * 4
    else:  # eager / math: q, k, v are copied (k and v expanded to every query head)
        t["q, k, v copies"] = N * a * (4 * C if rope else 3 * C)
        t["attention probabilities"] = B * nh * T * T * a  # one tensor: softmax out = bmm in
        if drop:
            t["attention dropout"] = B * nh * T * T * (mask_b + a)
        t["attention output"] = N * C * a * needs("o")
        t["causal mask"] = T * T
        if rope and w.precision in ("bf16-mixed", "fp16-mixed"):
            t["rope cos/sin casts"] = 4 * T * hd * 2
    if drop:
        t["residual dropout masks"] = 2 * N * C * mask_b
    if cfg.mlp == "swiglu":
        t["mlp gate, silu, up"] = 3 * N * F * a
        t["mlp product (down input)"] = N * F * a * needs("down")
    else:
        t["mlp fc output"] = N * F * a
        t["mlp gelu output (proj input)"] = N * F * a * needs("down")
    if lora:
        n_targets = sum(1 for x in w.lora_targets if x != "head")
        t["lora A outputs"] = n_targets * N * w.lora_rank * a
        if w.lora_dropout > 0:
            t["lora dropout"] = n_targets * N * C * (a + mask_b)
    return t


def selective_activation_terms(
    cfg: DecoderConfig, w: Workload, weight_bytes: int
) -> tuple[dict[str, float], float]:
    """Bytes one block keeps under selective checkpointing (``models/activation_checkpointing``):
    its input and the outputs of its matmuls and attention kernel; everything pointwise is rebuilt
    in backward. Also returns how many of these bytes no checkpointing would not keep (outputs
    that backward does not need: the o and down projections', the eager attention's two bmm
    outputs, LoRA B's), which the recompute of a block adds to its usual activations.
    """
    B, T, C, F = w.batch, w.seq, cfg.d_model, cfg.ff_width
    N = B * T
    nh = cfg.n_head
    kvd = cfg.kv_heads * (C // nh)
    a, r, _ = _dtypes(w, weight_bytes)
    kernel = attention_kernel(w)
    drop = cfg.dropout > 0
    if drop and kernel == "sdpa" and w.device == "cpu":
        kernel = "math"  # SDPA's math fallback: its two bmm are saved, as eager's
    t: dict[str, float] = {"block input": N * C * r, "qkv output": N * (C + 2 * kvd) * a}
    extra = {"o output": N * C * a, "down output": N * C * a}
    if kernel == "sdpa":
        if not drop:  # a fused kernel with dropout draws random numbers: it is recomputed
            t["attention output, logsumexp"] = N * C * a + N * nh * 4
    else:  # scores q·kᵀ and probabilities·v (the softmax and its casts are recomputed)
        extra |= {"attention scores": B * nh * T * T * a, "attention bmm output": N * C * a}
    if cfg.mlp == "swiglu":
        t["mlp gate, up outputs"] = 2 * N * F * a
    else:
        t["mlp fc output"] = N * F * a
    if w.method != "full":  # each adapter: A's output (saved anyway) and B's
        shapes = {"q": C, "k": kvd, "v": kvd, "qkv": C + 2 * kvd, "o": C}
        shapes |= {"gate": F, "up": F, "fc": F, "down": C}
        targets = [x for x in w.lora_targets if x in shapes]
        t["lora A outputs"] = len(targets) * N * w.lora_rank * a
        extra["lora B outputs"] = sum(N * shapes[x] * a for x in targets)
    return t | extra, sum(extra.values())


def estimate(cfg: DecoderConfig, w: Workload) -> Estimate:
    """Predicted peak bytes of one steady-state training step (or of inference) per device."""
    if cfg.vocab_size is None:
        raise ValueError("estimate needs model.vocab_size (set it, or give a tokenizer/model)")
    pc = count_params(cfg)
    V, C, L = cfg.vocab_size, cfg.d_model, cfg.n_layer
    N = w.batch * w.seq  # tokens per micro-batch
    notes: list[str] = []
    wb = 2 if w.precision == "bf16" else 4
    a, r, cast = _dtypes(w, wb)
    linear_per_layer = sum(pc.per_layer_linear.values())
    matmul_weights = L * linear_per_layer + V * C  # the head is a matmul even when tied
    comps: dict[str, float] = {}

    # weights
    if w.method == "qlora":
        nf4 = NF4_DQ_BYTES_PER_PARAM if w.qlora_double_quant else NF4_BYTES_PER_PARAM
        quantized = L * linear_per_layer + (pc.head if w.quantize_head else 0)
        comps["weights"] = quantized * nf4 + (pc.total - quantized) * wb
    else:
        comps["weights"] = pc.total * wb
    n_train = trainable_params(cfg, w)
    train_b = wb  # adapters in the base's dtype (litgpt, torchtune)
    if w.method in ("lora", "dora", "qlora"):
        comps["lora adapters"] = n_train * train_b
    if w.inference:
        return _inference(cfg, w, comps, pc, notes)

    # gradients and optimizer states
    shard = max(1, w.world_size)
    g = n_train * train_b
    opt_per = {"adamw": 2, "adam": 2, "adagrad": 1, "none": 0}.get(w.optimizer)
    if w.optimizer == "sgd":
        opt_per = 1 if w.momentum > 0 else 0
    if w.optimizer == "rmsprop":
        opt_per = 1 + (w.momentum > 0)
    opt = n_train * (2 if w.optimizer == "adamw8bit" else opt_per * train_b)
    if w.paged_optimizer:
        opt = 0.0  # cudaMallocManaged pages: not in max_memory_allocated (see notes)
        notes.append("paged optimizer states live in CUDA managed memory, outside the allocator")
    if w.optimizer_in_backward:  # only the gradient being applied is live
        g = max(pc.per_layer_linear.values()) * train_b if w.method == "full" else g
    if w.sharding in ("zero1", "zero2", "zero3"):
        opt /= shard
    if w.sharding in ("zero2", "zero3"):
        g /= shard
    if w.sharding == "zero3":
        full_layer = pc.layer * wb
        comps["weights"] = comps["weights"] / shard + 2 * full_layer  # gathered unit + prefetch
        notes.append("zero3/FSDP: weights sharded; one gathered block and one prefetched")
    comps["gradients"] = g
    comps["optimizer states"] = opt
    if w.world_size > 1 and w.sharding == "none":
        comps["DDP gradient buckets"] = g  # gradient_as_bucket_view=False keeps a copy

    # activations
    terms = block_activation_terms(cfg, _block_workload(w), wb)
    per_layer = sum(terms.values())
    head_trainable = _head_trained(w) or (w.method != "freeze" and "head" in w.lora_targets)
    head_acts = N * C * r + N * C * cast * head_trainable  # norm_f input / output
    if cfg.norm == "rmsnorm" and w.precision != "fp32":
        head_acts += N * C * 4 * (1 if w.precision in ("bf16-mixed", "fp16-mixed") else 2)
    if cfg.dropout > 0:
        head_acts += N * C * (a if w.device == "cpu" else 1)  # embedding dropout mask
    mixed = w.precision in ("bf16-mixed", "fp16-mixed")
    weight_casts = 2 * matmul_weights if mixed and w.method != "qlora" else 0
    if weight_casts and w.method == "freeze" and not (w.train_norms or w.train_embeddings):
        # casts of frozen weights are not cached; with no gradient below, none is saved
        weight_casts -= 2 * (L - _trained_blocks(cfg, w)) * linear_per_layer
    if w.checkpointing == "full":
        kept, rebuilt = N * C * r, per_layer
        comps["activations (checkpointed block inputs)"] = L * kept + head_acts
        weight_casts = 2 * V * C if mixed else 0  # only the head's cast outlives the forward
    elif w.checkpointing == "selective":
        sel, sel_extra = selective_activation_terms(cfg, _block_workload(w), wb)
        kept = sum(sel.values())
        rebuilt = per_layer - (kept - sel_extra)  # what the recompute allocates anew
        comps["activations (selective: block inputs, matmul outputs)"] = L * kept + head_acts
        weight_casts = 2 * V * C if mixed else 0  # the blocks' casts are recomputed too
    else:
        comps["activations"] = _stacked_blocks(cfg, w, wb, per_layer) + head_acts
    if weight_casts:
        comps["autocast weight copies (16 bit)"] = weight_casts

    # logits and loss at the start of backward. F.cross_entropy on fp32 logits (fp32, or 16-bit
    # logits upcast first): the fp32 log-softmax is saved, and two fp32 (N, V) gradients (of the
    # loss and of the log-softmax input) exist. lmforge's 16-bit path (``models/decoder.py``
    # LowPrecisionCrossEntropy) saves the 16-bit logits themselves and builds their 16-bit
    # gradient through one fp32 chunk of rows.
    logits = {"logits": N * V * a} if w.logits_in_backward else {}
    if a == 2 and not (w.loss_upcast or w.loss_chunks > 1 or w.loss_fused):
        if not w.logits_in_backward:  # otherwise the same tensor is counted as "logits"
            logits["loss: saved 16-bit logits"] = N * V * 2
        chunk = loss_chunk_rows(N, V, w.device) * V * 4
        logits["loss: backward temporaries"] = N * V * 2 + chunk
    else:
        fused = max(1, w.loss_chunks) if w.loss_fused else 1  # one chunk's log-softmax saved
        logits["loss: fp32 log-softmax"] = N * V * 4 / fused
        logits["loss: backward temporaries"] = 2 * N * V * 4 / max(1, w.loss_chunks)
    base = {k: comps[k] for k in ("weights", "lora adapters", "optimizer states") if k in comps}
    if "DDP gradient buckets" in comps:
        base["DDP gradient buckets"] = comps["DDP gradient buckets"]
    grads = {"gradients": comps["gradients"]}
    acts = {k: v for k, v in comps.items() if k.startswith(("activations", "autocast"))}
    phases: dict[str, dict[str, float]] = {}
    # micro-batches after the first find the accumulated gradients already there
    phases["start of backward (vocabulary-sized loss gradients)"] = (
        base | (grads if w.grad_accum > 1 else {}) | acts | logits
    )
    # backward, block by block: the logits tensor is still referenced by the loop, gradients
    # appear as saved activations are freed, and inside a block the MLP's hidden-width
    # activation gradients are live (GELU: 2, SwiGLU: 3) once the down projection's input has
    # been freed (its gradients are made). Checkpointing rebuilds one block.
    ckpt = w.checkpointing != "none"
    block_casts = 2 * linear_per_layer if mixed and (ckpt or w.method != "qlora") else 0
    down_in = terms.get("mlp product (down input)", 0)
    down_in += terms.get("mlp gelu output (proj input)", 0)
    inside = {"recomputed block": rebuilt + block_casts - down_in} if ckpt else {}
    hidden_grads = (3 if cfg.mlp == "swiglu" else 2) * N * cfg.ff_width * a
    inside |= {"temporaries (activation gradients)": hidden_grads + 2 * N * C * 4}
    held = {"logits": N * V * a} if w.logits_in_backward else {}
    inside |= held
    head_g = {"gradients (head)": V * C * wb} if w.method == "full" and w.grad_accum == 1 else {}
    if ckpt:
        kept_all = {"activations (kept by checkpointing)": L * kept}
    else:
        kept_all = acts | {"activations": acts["activations"] - down_in}
    last = "backward recompute of the last block" if ckpt else "backward of the last block"
    phases[last] = base | (grads if w.grad_accum > 1 else head_g) | kept_all | inside
    if (
        w.grad_accum == 1 and w.method == "full" and L > 1 and not w.optimizer_in_backward
        and w.sharding in ("none", "zero1")
    ):  # fmt: skip
        # the first block's backward: the gradients of every later block and the head exist,
        # the activations of the first block alone are left
        pos_emb = pc.embedding - V * C
        later = (pc.total - pc.layer - pos_emb - (0 if cfg.tie_embeddings else V * C)) * wb
        first = {"activations (first block)": kept if ckpt else per_layer + block_casts - down_in}
        phases["backward of the first block"] = (
            base | {"gradients (later blocks, head)": later} | first | inside
        )
    end = base | grads | held
    if cfg.tie_embeddings and w.method == "full":
        # the head's gradient waits in autograd's buffer for the embedding's; both and their
        # sum are live before the sum becomes the weight's gradient
        end["gradients"] -= V * C * wb / (shard if w.sharding in ("zero2", "zero3") else 1)
        end["temporaries (tied embedding gradients and sum)"] = 3 * V * C * wb
    phases["end of backward"] = end
    phases["optimizer step"] = base | grads
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    live = phases[phase]
    all_items = comps | logits
    overhead = CUDA_CONTEXT_BYTES if w.device == "cuda" else 0
    overhead += NCCL_BUFFER_BYTES if w.world_size > 1 else 0
    if mixed:
        notes.append("autocast keeps a 16-bit copy of every matmul weight through backward")
    if attention_kernel(w) == "eager":
        notes.append("eager attention keeps B x heads x T x T probabilities")
    est = Estimate(
        live, sum(live.values()), phase, per_layer, overhead, cpu_load_peak(cfg, wb), notes
    )
    est.all_components = all_items
    return est


def _inference(
    cfg: DecoderConfig, w: Workload, comps: dict[str, float], pc: ParamCounts, notes: list[str]
) -> Estimate:
    """Weights + KV cache (B x context x layers x 2 x kv heads x head dim) + the prefill logits."""
    kv_bytes = 2 if w.precision != "fp32" else 4
    hd = cfg.d_model // cfg.n_head
    comps["KV cache"] = 2 * cfg.n_layer * w.batch * w.seq * cfg.kv_heads * hd * kv_bytes
    comps["prefill logits"] = w.batch * w.seq * (cfg.vocab_size or 0) * kv_bytes
    peak = sum(comps.values())
    overhead = CUDA_CONTEXT_BYTES if w.device == "cuda" else 0
    gqa = f"GQA {cfg.n_head}/{cfg.kv_heads} heads" if cfg.kv_heads < cfg.n_head else "MHA"
    return Estimate(
        comps,
        peak,
        f"inference ({gqa})",
        0.0,
        overhead,
        cpu_load_peak(cfg, kv_bytes),
        notes,
        dict(comps),
    )


def cpu_load_peak(cfg: DecoderConfig, weight_bytes: int) -> float:
    """Host memory while loading a Hugging Face folder: ``load_hf`` fills a meta model shard by
    shard, so about one copy of the model plus the largest tensor (the embedding) in flight."""
    pc = count_params(cfg)
    return pc.total * weight_bytes + (cfg.vocab_size or 0) * cfg.d_model * 4


# ---- time and hardware -----------------------------------------------------------------------


def flops_per_token(cfg: DecoderConfig, seq: int, checkpointing: str = "none") -> float:
    """Training FLOPs per token, 6N + 12·L·T·d (as ``Decoder.flops_per_token``); full
    checkpointing recomputes the forward: 8N + 16·L·T·d. Selective keeps the matmul and
    attention outputs and recomputes only pointwise ops, O(d) FLOPs per token against the
    matmuls' O(d²), so it is counted as 1x (no matmul FLOPs are repeated)."""
    pc = count_params(cfg)
    n_matmul = pc.n_layer * sum(pc.per_layer_linear.values()) + (cfg.vocab_size or 0) * cfg.d_model
    f = 6.0 * n_matmul + 12.0 * cfg.n_layer * seq * cfg.d_model
    return f * 4 / 3 if checkpointing == "full" else f


def hardware_table(
    cfg: DecoderConfig, w: Workload, tokens: float | None = None, mfu: float = DEFAULT_MFU
) -> list[dict]:
    """For each named GPU: does it fit, how many devices (ZeRO-3) it takes, time per step/run."""
    rows = []
    low = w.precision != "fp32"
    for name, (mem, bf16, fp32) in GPUS.items():
        need_n = None
        for n in (1, 2, 4, 8, 16, 32, 64):
            ww = replace(w, device="cuda", world_size=n, sharding="zero3" if n > 1 else "none")
            est = estimate(cfg, ww)
            if est.peak + est.runtime_overhead <= mem * (1 - ALLOCATOR_SLACK):
                need_n = n
                break
        step_tokens = w.batch * w.seq * w.grad_accum * max(1, w.world_size)
        fl = flops_per_token(cfg, w.seq, w.checkpointing) * step_tokens
        speed = (bf16 if low else fp32) * mfu
        row = dict(gpu=name, memory_gib=mem / GiB, fits_one=need_n == 1, devices_needed=need_n)
        row["step_s"] = fl / speed / max(1, w.world_size)
        if tokens:
            row["run_h"] = tokens * fl / step_tokens / (speed * (need_n or 1)) / 3600
        rows.append(row)
    return rows


def parse_bytes(text: str) -> float:
    """'24GiB', '40GB', '512MiB', '1.5e9' → bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    units |= {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}
    s = text.strip().lower().replace(" ", "")
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            s, scale = s[: -len(u)], units[u]
            break
    else:
        scale = 1
    try:
        return float(s) * scale
    except ValueError:
        from lmforge.errors import ConfigError

        raise ConfigError(
            f"memory size {text!r} (--fit, train.memory_budget): write e.g. 24GiB, 40GB, 512MiB, "
            "1.5e9 (bytes) or auto (this machine's free memory)"
        ) from None


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def steps_for(tokens: float, w: Workload) -> int:
    return math.ceil(tokens / (w.batch * w.seq * w.grad_accum * max(1, w.world_size)))
