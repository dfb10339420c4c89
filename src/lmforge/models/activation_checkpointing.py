"""Activation checkpointing of a transformer block: none, selective (op-level) or full.

``full`` keeps only each block's input and reruns the whole block in backward (Chen et al. 2016).
``selective`` is op-level selective checkpointing as torchtitan and Megatron-LM do it: the block
still runs under ``torch.utils.checkpoint``, but a policy keeps the outputs of the expensive ops
(matmuls and the attention kernel) and backward reruns only the cheap ones in between (norms,
activations, RoPE, softmax, dropout, residual adds, dtype casts) from those saved outputs.

``rebuilt_in_backward`` is the smallest case, used without ``checkpoint``: a LoRA block's norm
outputs are saved only as the adapters' inputs, while the norm keeps its own input anyway, so
backward can rerun the norm (one pointwise pass) instead of holding its output.

Why this split: the pointwise ops hold most of a block's saved bytes (a GELU or SwiGLU block
keeps 2-4 tensors of hidden width for them, norms keep their input and output, RoPE its halves)
but cost O(B·T·d) FLOPs, while the matmuls cost O(B·T·d²) and attention O(B·T²·d). Saving the
latter and recomputing the former drops a large part of the activations for almost no extra
time; full checkpointing saves more memory but recomputes the whole forward (+1/3 FLOPs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


class _Rebuild:
    """A saved tensor stored as how to make it again: ``rebuild()`` viewed as the saved view."""

    def __init__(self, rebuild: Callable[[], torch.Tensor], like: torch.Tensor) -> None:
        self.rebuild = rebuild
        self.size, self.stride, self.offset = like.size(), like.stride(), like.storage_offset()

    def materialize(self, cache: list) -> torch.Tensor:
        if not cache:  # several ops may save the same output (gate and up): rebuild it once
            with torch.no_grad():
                cache.append(self.rebuild())
        return cache[0].as_strided(self.size, self.stride, self.offset)


@contextlib.contextmanager
def rebuilt_in_backward(
    output: torch.Tensor, rebuild: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Within the block, an op that saves ``output`` (or a view of it) for backward saves a
    recipe instead, and backward calls ``rebuild()`` (which must return the same values with
    the same layout, e.g. the norm that made ``output`` applied to its input again).

    Only worth it when ``rebuild`` keeps nothing alive that backward did not keep anyway (a
    norm's input is saved by the norm itself). Not for use under ``checkpoint`` or autocast
    (their own saved-tensor handling and casts): ``Block`` calls it only without them."""
    # the address and dtype only: the hooks must not keep ``output`` itself alive
    storage, dtype = output.untyped_storage().data_ptr(), output.dtype
    cache: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor | tuple[_Rebuild, list]:
        if t.untyped_storage().data_ptr() == storage and t.dtype == dtype:
            return _Rebuild(rebuild, t), cache
        return t

    def unpack(saved: torch.Tensor | tuple[_Rebuild, list]) -> torch.Tensor:
        return saved if isinstance(saved, torch.Tensor) else saved[0].materialize(saved[1])

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
