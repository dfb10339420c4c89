"""Predict the peak memory of a training step (and of inference) from the config alone.

The model is described by its config (no weights), its parameters are counted by role
(``plan/params.py``), and the activations saved for backward are summed tensor by tensor, the
way autograd keeps them in lmforge's own layers (``plan/activations.py``). Each component has
its own function below; docs/memory.md lists the terms, where each comes from and how it was
checked.

Peak of a steady-state step (step >= 2: the optimizer states exist) is the largest of
  forward/backward: weights + optimizer + (gradients if accumulating) + saved activations
                    + the loss's vocabulary-sized tensors at the start of backward (where the
                    peak usually falls): fp32 logits — the fp32 log-softmax and two fp32
                    gradients; 16-bit logits — the logits, their 16-bit gradient and one fp32
                    chunk (lmforge's ``token_loss_sum``), or the upcast path's fp32 tensors
                    (``PeerPractice.loss_upcast``: litgpt, torchtune)
  recompute (selective or full activation checkpointing): one block's activations rebuilt in
                    backward
  optimizer step:   weights + gradients + optimizer states
All byte counts are exact sizes of tensors; CUDA adds its context and allocator slack outside
``torch.cuda.max_memory_allocated`` (``CUDA_CONTEXT_BYTES``), reported separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lmforge.models.decoder import DecoderConfig, loss_chunk_rows
from lmforge.plan.activations import (
    all_blocks,
    attention_kernel,
    autocast_weight_copies,
    block_activation_terms,
    block_weight_copies,
    costliest_block_workload,
    down_projection_input,
    model_level_activations,
    param_bytes,
    selective_activation_terms,
    tensor_widths,
)
from lmforge.plan.params import ParamCounts, count_params, trainable_params
from lmforge.plan.workload import LMFORGE_PRACTICE, PeerPractice, Workload, lora_terms

# The estimator's public names; Workload, PeerPractice and lora_terms live in plan/workload.py
# and are re-exported because callers describe a workload where they call ``estimate``.
__all__ = [
    "GiB", "Estimate", "PeerPractice", "Workload", "count_params", "estimate", "fmt_bytes",
    "lora_terms", "parse_bytes",
]  # fmt: skip

GiB = 2**30

# ---- named constants (values and sources in docs/memory.md) ----------------------------------
# CUDA context + cuBLAS/cuDNN workspaces, outside the caching allocator: typically 0.3-1 GiB
# (PyTorch "CUDA semantics" notes; nvidia-smi minus max_memory_reserved on A100/H100).
CUDA_CONTEXT_BYTES = 600 * 2**20
# NCCL communicator buffers per process: NCCL_BUFFSIZE (default 4 MiB) x channels (up to 32)
# x 2 directions for a ring; ~256 MiB is what nvidia-smi shows per rank on 8-GPU nodes.
NCCL_BUFFER_BYTES = 256 * 2**20
# QLoRA NF4 storage: 4 bits + one fp32 absmax per 64 weights (bitsandbytes blocksize 64), or
# with double quantisation an 8-bit absmax per 64 + one fp32 per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
NF4_DQ_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Optimizer state tensors per trained parameter, each in the parameter's dtype (8-bit AdamW:
# two 1-byte states, see ``optimizer_state_bytes``). SGD and RMSprop depend on the momentum.
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "adagrad": 1, "none": 0}


@dataclass
class Estimate:
    """Predicted bytes by component; ``peak`` is what ``max_memory_allocated`` would show."""

    components: dict[str, float]  # live at the peak
    peak: float
    phase: str  # where the peak falls
    per_layer_activation: float
    runtime_overhead: float = 0.0  # CUDA context, NCCL: outside the allocator
    cpu_load_peak: float = 0.0
    notes: list[str] = field(default_factory=list)
    all_components: dict[str, float] = field(default_factory=dict)  # each at full size

    def to_dict(self) -> dict:
        return asdict(self)


# ---- weights, gradients, optimizer states (bytes per device) ---------------------------------


def weight_bytes(cfg: DecoderConfig, w: Workload, peer: PeerPractice = LMFORGE_PRACTICE) -> float:
    """All weights: ``param_bytes`` each, except QLoRA's NF4 blocks (and head, when the peer
    quantises it) at ~0.5 bytes per weight."""
    counts = count_params(cfg)
    if w.method != "qlora":
        return counts.total * param_bytes(w)
    nf4 = NF4_DQ_BYTES_PER_PARAM if w.qlora_double_quant else NF4_BYTES_PER_PARAM
    quantized = cfg.n_layer * counts.linear_per_layer + (counts.head if peer.quantize_head else 0)
    return quantized * nf4 + (counts.total - quantized) * param_bytes(w)


def gradient_bytes(cfg: DecoderConfig, w: Workload, peer: PeerPractice = LMFORGE_PRACTICE) -> float:
    """Gradients of the trained parameters; with the optimizer in backward only the largest
    linear's (full fine-tune) is live at once; ZeRO-2/3 shard them over the devices."""
    grads: float = trainable_params(cfg, w) * param_bytes(w)
    if peer.optimizer_in_backward and w.method == "full":
        grads = max(count_params(cfg).per_layer_linear.values()) * param_bytes(w)
    if w.sharding in ("zero2", "zero3"):
        grads /= max(1, w.world_size)
    return grads


def optimizer_state_bytes(
    cfg: DecoderConfig, w: Workload, peer: PeerPractice = LMFORGE_PRACTICE
) -> float:
    """Optimizer states of the trained parameters (Adam: two per parameter; 8-bit AdamW: two
    bytes); paged states live in CUDA managed memory, off the allocator (0); ZeRO-1/2/3 shard
    them over the devices."""
    trained = trainable_params(cfg, w)
    if w.optimizer == "adamw8bit":
        states: float = trained * 2
    else:
        per_param = OPTIMIZER_STATES.get(w.optimizer, 0)
        if w.optimizer == "sgd":
            per_param = 1 if w.momentum > 0 else 0
        if w.optimizer == "rmsprop":
            per_param = 1 + (w.momentum > 0)
        states = trained * (per_param * param_bytes(w))
    if peer.paged_optimizer:
        states = 0.0
    if w.sharding in ("zero1", "zero2", "zero3"):
        states /= max(1, w.world_size)
    return states


def sharded_weight_bytes(cfg: DecoderConfig, w: Workload, weights: float) -> float:
    """ZeRO-3 / FSDP: this device's shard of ``weights`` + one gathered block + one prefetched."""
    return weights / max(1, w.world_size) + 2 * count_params(cfg).layer * param_bytes(w)


# ---- the loss --------------------------------------------------------------------------------


def loss_bytes(
    cfg: DecoderConfig, w: Workload, peer: PeerPractice = LMFORGE_PRACTICE
) -> dict[str, float]:
    """Vocabulary-sized tensors at the start of backward, by term.

    F.cross_entropy on fp32 logits (fp32, or 16-bit logits upcast first): the fp32 log-softmax
    is saved, and two fp32 (tokens, vocab) gradients (of the loss and of the log-softmax input)
    exist. lmforge's 16-bit path (``models/decoder.py`` LowPrecisionCrossEntropy) saves the
    16-bit logits themselves and builds their 16-bit gradient through one fp32 chunk of rows.
    A peer that holds the logits in backward adds them as "logits".
    """
    n_tok, vocab = w.tokens, cfg.vocab_size or 0
    logits_b = tensor_widths(w).matmul_output
    terms: dict[str, float] = (
        {"logits": n_tok * vocab * logits_b} if peer.logits_in_backward else {}
    )
    if logits_b == 2 and not peer.upcasts_logits:
        if not peer.logits_in_backward:  # otherwise the same tensor is counted as "logits"
            terms["loss: saved 16-bit logits"] = n_tok * vocab * 2
        chunk = loss_chunk_rows(n_tok, vocab, w.device) * vocab * 4
        terms["loss: backward temporaries"] = n_tok * vocab * 2 + chunk
    else:
        saved_chunks = max(1, peer.loss_chunks) if peer.loss_fused else 1  # one chunk at a time
        terms["loss: fp32 log-softmax"] = n_tok * vocab * 4 / saved_chunks
        terms["loss: backward temporaries"] = 2 * n_tok * vocab * 4 / max(1, peer.loss_chunks)
    return terms


# ---- outside the allocator ---------------------------------------------------------------------


def runtime_overhead_bytes(w: Workload) -> int:
    """CUDA context and NCCL buffers: device memory ``max_memory_allocated`` does not count."""
    overhead = CUDA_CONTEXT_BYTES if w.device == "cuda" else 0
    if w.world_size > 1 and not w.inference:
        overhead += NCCL_BUFFER_BYTES
    return overhead


def cpu_load_peak(cfg: DecoderConfig, weight_bytes: int) -> float:
    """Host memory while loading a Hugging Face folder: ``load_hf`` fills a meta model shard by
    shard, so about one copy of the model plus the largest tensor (the embedding) in flight."""
    return count_params(cfg).total * weight_bytes + (cfg.vocab_size or 0) * cfg.d_model * 4


# ---- the estimate ------------------------------------------------------------------------------


def estimate(cfg: DecoderConfig, w: Workload, peer: PeerPractice = LMFORGE_PRACTICE) -> Estimate:
    """Predicted peak bytes of one steady-state training step (or of inference) per device.

    ``peer``: another library's loop practice, to compare with its published figures (the
    default is lmforge's own)."""
    if cfg.vocab_size is None:
        raise ValueError("estimate needs model.vocab_size (set it, or give a tokenizer/model)")
    counts = count_params(cfg)
    components: dict[str, float] = {"weights": weight_bytes(cfg, w, peer)}
    if w.method in ("lora", "dora", "qlora"):
        components["lora adapters"] = trainable_params(cfg, w) * param_bytes(w)
    if w.inference:
        return _inference(cfg, w, components)

    notes: list[str] = []
    if peer.paged_optimizer:
        notes.append("paged optimizer states live in CUDA managed memory, outside the allocator")
    if w.sharding == "zero3":
        components["weights"] = sharded_weight_bytes(cfg, w, components["weights"])
        notes.append("zero3/FSDP: weights sharded; one gathered block and one prefetched")
    components["gradients"] = gradient_bytes(cfg, w, peer)
    components["optimizer states"] = optimizer_state_bytes(cfg, w, peer)
    if w.world_size > 1 and w.sharding == "none":
        # DDP's gradient_as_bucket_view=False keeps a second copy in its buckets
        components["DDP gradient buckets"] = components["gradients"]

    block = block_activation_terms(cfg, costliest_block_workload(w), peer.lean_lora_blocks)
    per_layer = sum(block.values())
    activations = _activations(cfg, w, per_layer)
    components |= activations.saved
    copies = autocast_weight_copies(cfg, w)
    if copies:
        components["autocast weight copies (16 bit)"] = copies
    loss = loss_bytes(cfg, w, peer)

    phases = _phases(cfg, w, peer, counts, components, loss, block, activations)
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    live = phases[phase]
    if w.mixed:
        notes.append("autocast keeps a 16-bit copy of every matmul weight through backward")
    if attention_kernel(w) == "eager":
        notes.append("eager attention keeps B x heads x T x T probabilities")
    est = Estimate(
        live, sum(live.values()), phase, per_layer, runtime_overhead_bytes(w),
        cpu_load_peak(cfg, param_bytes(w)), notes,
    )  # fmt: skip
    est.all_components = components | loss
    return est


@dataclass(frozen=True)
class _Activations:
    saved: dict[str, float]  # the component: every block (as checkpointing keeps it) + model level
    kept_per_layer: float  # what checkpointing keeps of one block (0 without checkpointing)
    rebuilt: float  # what the recompute of one block allocates anew (0 without checkpointing)


def _activations(cfg: DecoderConfig, w: Workload, per_layer: float) -> _Activations:
    """Saved activations under ``w.checkpointing``: full keeps each block's input and rebuilds
    the whole block; selective keeps the matmul and attention outputs too and rebuilds the rest."""
    model_level = model_level_activations(cfg, w)
    n_layer = cfg.n_layer
    if w.checkpointing == "full":
        kept = w.tokens * cfg.d_model * tensor_widths(w).residual
        name = "activations (checkpointed block inputs)"
        return _Activations({name: n_layer * kept + model_level}, kept, per_layer)
    if w.checkpointing == "selective":
        selective, not_needed = selective_activation_terms(cfg, costliest_block_workload(w))
        kept = sum(selective.values())
        rebuilt = per_layer - (kept - not_needed)
        name = "activations (selective: block inputs, matmul outputs)"
        return _Activations({name: n_layer * kept + model_level}, kept, rebuilt)
    return _Activations({"activations": all_blocks(cfg, w, per_layer) + model_level}, 0, 0)


def _phases(
    cfg: DecoderConfig,
    w: Workload,
    peer: PeerPractice,
    counts: ParamCounts,
    components: dict[str, float],
    loss: dict[str, float],
    block: dict[str, float],
    activations: _Activations,
) -> dict[str, dict[str, float]]:
    """Live bytes by component at each moment of a step where the peak can fall, in order."""
    vocab, d_model, n_layer = cfg.vocab_size or 0, cfg.d_model, cfg.n_layer
    p_bytes, out_b = param_bytes(w), tensor_widths(w).matmul_output
    resident = ("weights", "lora adapters", "optimizer states", "DDP gradient buckets")
    base = {name: components[name] for name in resident if name in components}
    grads = {"gradients": components["gradients"]}
    # micro-batches after the first find the accumulated gradients already there
    accumulated = grads if w.grad_accum > 1 else {}
    saved = {k: v for k, v in components.items() if k.startswith(("activations", "autocast"))}
    phases: dict[str, dict[str, float]] = {}
    phases["start of backward (vocabulary-sized loss gradients)"] = (
        base | accumulated | saved | loss
    )
    # backward, block by block: the logits tensor is still referenced by a peer's loop,
    # gradients appear as saved activations are freed, and inside a block the MLP's
    # hidden-width activation gradients are live (GELU: 2, SwiGLU: 3) once the down
    # projection's input has been freed (its gradients are made). Checkpointing rebuilds one
    # block.
    checkpointed = w.checkpointing != "none"
    block_copies = block_weight_copies(cfg, w)
    down_in = down_projection_input(block)
    in_block = {}
    if checkpointed:
        in_block["recomputed block"] = activations.rebuilt + block_copies - down_in
    hidden_grads = (3 if cfg.mlp == "swiglu" else 2) * w.tokens * cfg.ff_width * out_b
    in_block["temporaries (activation gradients)"] = hidden_grads + 2 * w.tokens * d_model * 4
    held = {"logits": w.tokens * vocab * out_b} if peer.logits_in_backward else {}
    in_block |= held
    head_grad = {}
    if w.method == "full" and w.grad_accum == 1:
        head_grad["gradients (head)"] = vocab * d_model * p_bytes
    if checkpointed:
        kept = {"activations (kept by checkpointing)": n_layer * activations.kept_per_layer}
        last = "backward recompute of the last block"
    else:
        kept = saved | {"activations": saved["activations"] - down_in}
        last = "backward of the last block"
    phases[last] = base | (grads if w.grad_accum > 1 else head_grad) | kept | in_block
    if (
        w.grad_accum == 1 and w.method == "full" and n_layer > 1
        and not peer.optimizer_in_backward and w.sharding in ("none", "zero1")
    ):  # fmt: skip
        # the first block's backward: the gradients of every later block and the head exist,
        # the activations of the first block alone are left
        positions = counts.embedding - vocab * d_model
        untied_head = 0 if cfg.tie_embeddings else vocab * d_model
        later = (counts.total - counts.layer - positions - untied_head) * p_bytes
        if checkpointed:
            first = activations.kept_per_layer
        else:
            first = sum(block.values()) + block_copies - down_in
        phases["backward of the first block"] = (
            base | {"gradients (later blocks, head)": later}
            | {"activations (first block)": first} | in_block
        )  # fmt: skip
    end = base | grads | held
    if cfg.tie_embeddings and w.method == "full":
        # the head's gradient waits in autograd's buffer for the embedding's; both and their
        # sum are live before the sum becomes the weight's gradient
        sharded = w.sharding in ("zero2", "zero3")
        end["gradients"] -= vocab * d_model * p_bytes / (max(1, w.world_size) if sharded else 1)
        end["temporaries (tied embedding gradients and sum)"] = 3 * vocab * d_model * p_bytes
    phases["end of backward"] = end
    phases["optimizer step"] = base | grads
    return phases


def _inference(cfg: DecoderConfig, w: Workload, components: dict[str, float]) -> Estimate:
    """Weights + KV cache (batch x context x layers x 2 x kv heads x head dim) + the prefill
    logits."""
    kv_bytes = 2 if w.precision != "fp32" else 4
    head_dim = cfg.d_model // cfg.n_head
    components["KV cache"] = 2 * cfg.n_layer * w.batch * w.seq * cfg.kv_heads * head_dim * kv_bytes
    components["prefill logits"] = w.batch * w.seq * (cfg.vocab_size or 0) * kv_bytes
    attention = f"GQA {cfg.n_head}/{cfg.kv_heads} heads" if cfg.kv_heads < cfg.n_head else "MHA"
    return Estimate(
        components, sum(components.values()), f"inference ({attention})", 0.0,
        runtime_overhead_bytes(w), cpu_load_peak(cfg, kv_bytes), [], dict(components),
    )  # fmt: skip


# ---- byte sizes as people write them --------------------------------------------------------

BYTE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTE_UNITS |= {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}


def parse_bytes(text: str) -> float:
    """'24GiB', '40GB', '512MiB', '1.5e9' → bytes; anything else is a ValueError that names
    the accepted forms."""
    s = text.strip().lower().replace(" ", "")
    number, scale = s, 1.0
    for unit in sorted(BYTE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number, scale = s[: -len(unit)], BYTE_UNITS[unit]
            break
    try:
        return float(number) * scale
    except ValueError:
        raise ValueError(
            f"{text!r} is not a memory size: give a number of bytes with an optional unit, "
            "e.g. 24GiB, 80GB, 512MiB or 1.5e9"
        ) from None


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"
