"""Activation checkpointing of a transformer block: none, selective (op-level) or full.

``full`` keeps only each block's input and reruns the whole block in backward (Chen et al. 2016).
``selective`` is op-level selective checkpointing as torchtitan and Megatron-LM do it: the block
still runs under ``torch.utils.checkpoint``, but a policy keeps the outputs of the expensive ops
(matmuls and the attention kernel) and backward reruns only the cheap ones in between (norms,
activations, RoPE, softmax, dropout, residual adds, dtype casts) from those saved outputs.

Why this split: the pointwise ops hold most of a block's saved bytes (a GELU or SwiGLU block
keeps 2-4 tensors of hidden width for them, norms keep their input and output, RoPE its halves)
but cost O(B·T·d) FLOPs, while the matmuls cost O(B·T·d²) and attention O(B·T²·d). Saving the
latter and recomputing the former drops a large part of the activations for almost no extra
time; full checkpointing saves more memory but recomputes the whole forward (+1/3 FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

Checkpointing = Literal["none", "selective", "full"]

aten = torch.ops.aten
# nn.Linear reaches the dispatcher as mm (no bias) or addmm (bias); the matmuls of lmforge's
# eager attention (CPU bf16, and SDPA's math fallback with dropout on CPU) as bmm
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
# fused attention kernels: output (B, nh, T, hd) and logsumexp (B, nh, T) are what they return
ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_fused_attention_overrideable.default,
}


def selective_policy(save_attention: bool = True) -> Callable[..., CheckpointPolicy]:
    """The op policy of ``selective``: save matmul (and attention kernel) outputs, recompute
    everything else.

    ``save_attention=False`` when attention dropout is on: a fused kernel with dropout draws
    random numbers (CUDA's philox offset); skipping it in the recompute would shift the
    random stream of every dropout after it. Recomputing it (the RNG state is restored at the
    start of the recompute by ``checkpoint``) keeps every mask equal to the forward's.
    """
    save = MATMUL_OPS | (ATTENTION_OPS if save_attention else set())

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def run_block(
    block: Callable[..., torch.Tensor],
    mode: Checkpointing | bool,
    *args: Any,
    dropout: bool = False,
) -> torch.Tensor:
    """``block(*args)`` under ``mode`` (a bool is accepted: True = full). ``dropout``: the block
    draws random numbers in attention (see ``selective_policy``)."""
    if mode in ("none", False):
        return block(*args)
    if mode in ("full", True):
        return checkpoint(block, *args, use_reentrant=False)
    if mode == "selective":
        context = partial(create_selective_checkpoint_contexts, selective_policy(not dropout))
        return checkpoint(block, *args, use_reentrant=False, context_fn=context)
    raise ValueError(f"activation checkpointing must be none, selective or full (got {mode!r})")
