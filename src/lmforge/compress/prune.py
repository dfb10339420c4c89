"""Pruning: unstructured magnitude pruning (zeros) and structured pruning (a smaller model).

Unstructured: the smallest-magnitude weights of the linear layers of the blocks are set to
zero — ``global`` ranks all of them together (layers end up with different sparsities),
``layer`` prunes each layer to the same fraction. PyTorch's ``torch.nn.utils.prune`` does it
(``global_unstructured`` / ``l1_unstructured``) and ``prune.remove`` makes it permanent. The
shapes stay: the file is as large and dense matmuls are as slow, only a sparse kernel or
format would gain from the zeros.

Structured: whole attention heads and MLP channels are removed, so every block's matrices
shrink (``DecoderConfig.layers`` records the new sizes). The unit of attention is a kv group
— one key/value head with the query heads that share it (a single head without GQA) — since
removing a query head alone would leave the group's head count uneven. Each block keeps the
same fraction of its units, the most important ones, by one of two scores:

    taylor     |Σ ∂L/∂g|, the first-order estimate of how much the loss changes when a unit's
               output is switched off (a gate g = 1 on it; Molchanov et al. 2017, Michel et
               al. 2019 "Are sixteen heads really better than one?"), summed over calibration
               batches of next-token loss
    magnitude  ‖W_out[:, unit]‖₂ · ‖W_in[unit, :]‖₂, the norm of the weights that read into
               and write out of the unit (no data needed)

Only decoders are pruned structurally; any model (a classifier too) unstructurally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from lmforge.models.decoder import Decoder, LayerShape

Importance = Literal["taylor", "magnitude"]


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The (module, "weight") pairs unstructured pruning ranks: every ``nn.Linear`` except a
    decoder's output head (tied to the embedding, or the one layer every token reads)."""
    return [
        (m, "weight")
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    ]


def prune_unstructured(model: nn.Module, amount: float, scope: Literal["global", "layer"]) -> None:
    """Zero the ``amount`` fraction of smallest-|w| weights of ``prunable`` layers, in place,
    permanently (no masks or ``weight_orig`` left)."""
    params = prunable(model)
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in params:
            prune.l1_unstructured(module, name, amount=amount)
    remove_masks(model)


def freeze_zeros(model: nn.Module) -> None:
    """Put torch's pruning masks on the zeros of ``prunable`` weights, so that a fine-tune
    keeps them at zero (``remove_masks`` afterwards)."""
    for module, name in prunable(model):
        prune.custom_from_mask(module, name, mask=getattr(module, name) != 0)


def remove_masks(model: nn.Module) -> None:
    """Make torch's pruning masks permanent: the zeros go into the weight itself."""
    for module, name in prunable(model):
        if prune.is_pruned(module) and hasattr(module, name + "_mask"):
            prune.remove(module, name)


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights in the ``prunable`` layers."""
    zeros = total = 0
    for module, name in prunable(model):
        w = getattr(module, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(1, total)


# --- structured --------------------------------------------------------------------------


def _group_width(block: nn.Module) -> int:
    """Query-head channels of one kv group (heads per group × head size)."""
    attn = block.attn
    return attn.n_head // attn.n_kv_head * attn.head_dim


@contextlib.contextmanager
def unit_gates(model: Decoder) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per block a (kv groups,) and a (MLP channels,) gate of ones multiplying each unit's
    output (the inputs of ``attn.proj`` and ``mlp.proj``). Their gradients are the Taylor
    scores; set an entry to 0 to switch a unit off (how tests check structured pruning)."""
    gates, handles = [], []
    for block in model.blocks:
        g_attn = torch.ones(block.attn.n_kv_head, requires_grad=True)
        g_mlp = torch.ones(block.mlp.proj.in_features, requires_grad=True)
        width = _group_width(block)

        def attn_hook(_m: nn.Module, args: tuple, g: torch.Tensor = g_attn, w: int = width):
            (y,) = args  # (B, T, n_head·hd), query heads grouped by their kv head
            return (y * g.repeat_interleave(w).to(y.dtype),)

        def mlp_hook(_m: nn.Module, args: tuple, g: torch.Tensor = g_mlp):
            (h,) = args  # (B, T, d_ff)
            return (h * g.to(h.dtype),)

        handles.append(block.attn.proj.register_forward_pre_hook(attn_hook))
        handles.append(block.mlp.proj.register_forward_pre_hook(mlp_hook))
        gates.append((g_attn, g_mlp))
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


def taylor_scores(
    model: Decoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block (kv-group scores, MLP-channel scores): Σ over batches of |∂L/∂gate|."""
    scores = [
        (torch.zeros(b.attn.n_kv_head), torch.zeros(b.mlp.proj.in_features)) for b in model.blocks
    ]
    was_training = model.training
    model.eval()
    with unit_gates(model) as gates:
        for x, y in batches:
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
            grads = torch.autograd.grad(loss, [g for pair in gates for g in pair])
            for i, (s_attn, s_mlp) in enumerate(scores):
                s_attn += grads[2 * i].abs()
                s_mlp += grads[2 * i + 1].abs()
    model.train(was_training)
    return scores


def magnitude_scores(model: Decoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block (kv-group scores, MLP-channel scores) from weight norms (module doc)."""
    out = []
    with torch.no_grad():
        for b in model.blocks:
            attn, hd = b.attn, b.attn.head_dim
            nq, nkv = attn.n_head * hd, attn.n_kv_head * hd
            w = attn.qkv.weight
            q = w[:nq].reshape(attn.n_kv_head, -1, w.size(1))  # (groups, rows, d)
            k = w[nq : nq + nkv].reshape(attn.n_kv_head, -1, w.size(1))
            v = w[nq + nkv :].reshape(attn.n_kv_head, -1, w.size(1))
            w_in = torch.cat([q, k, v], dim=1).flatten(1).norm(dim=1)
            w_out = attn.proj.weight.reshape(attn.proj.out_features, attn.n_kv_head, -1)
            s_attn = w_in * w_out.transpose(0, 1).flatten(1).norm(dim=1)
            ins = [m.weight for m in (getattr(b.mlp, n, None) for n in ("fc", "gate", "up")) if m]
            s_mlp = torch.stack([x.norm(dim=1) for x in ins]).prod(0) * b.mlp.proj.weight.norm(
                dim=0
            )
            out.append((s_attn, s_mlp))
    return out


def keep_top(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Sorted indices of the units to keep: all but the ``amount`` fraction with the lowest
    scores, at least one."""
    n = scores.numel()
    keep = max(1, n - int(round(amount * n)))
    return scores.topk(keep).indices.sort().values


def prune_structured(
    model: Decoder,
    heads: float,
    channels: float,
    scores: list[tuple[torch.Tensor, torch.Tensor]],
) -> Decoder:
    """A new, smaller Decoder: in every block the ``heads`` fraction of kv groups and the
    ``channels`` fraction of MLP channels with the lowest ``scores`` removed. Its output
    equals ``model``'s with those units' gates at zero (``unit_gates``)."""
    shapes, keep = [], []
    for block, (s_attn, s_mlp) in zip(model.blocks, scores, strict=True):
        groups, chans = keep_top(s_attn, heads), keep_top(s_mlp, channels)
        per_group = block.attn.n_head // block.attn.n_kv_head
        shapes.append(LayerShape(n_head=len(groups) * per_group, n_kv_head=len(groups),
                                 d_ff=len(chans)))  # fmt: skip
        keep.append((groups, chans))
    cfg = model.cfg.model_copy(update={"layers": shapes})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, (block, (groups, chans)) in enumerate(zip(model.blocks, keep, strict=True)):
        _slice_block(state, f"blocks.{i}.", block, groups, chans)
    small = Decoder(type(cfg).model_validate(cfg.model_dump()))  # re-validated shapes
    small.load_state_dict(state)
    return small.to(next(model.parameters()).device)


def _slice_block(
    state: dict[str, torch.Tensor],
    prefix: str,
    block: nn.Module,
    groups: torch.Tensor,
    chans: torch.Tensor,
) -> None:
    """Cut the rows/columns of removed units out of one block's tensors in ``state``."""
    attn, hd = block.attn, block.attn.head_dim
    per_group = attn.n_head // attn.n_kv_head
    q_heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
    kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
    nq, nkv = attn.n_head * hd, attn.n_kv_head * hd
    rows = torch.cat([q_rows, nq + kv_rows, nq + nkv + kv_rows])
    for name in ("attn.qkv.weight", "attn.qkv.bias"):
        if prefix + name in state:
            state[prefix + name] = state[prefix + name][rows]
    state[prefix + "attn.proj.weight"] = state[prefix + "attn.proj.weight"][:, q_rows]
    for lin in ("fc", "gate", "up"):
        for p in ("weight", "bias"):
            key = f"{prefix}mlp.{lin}.{p}"
            if key in state:
                state[key] = state[key][chans]
    state[prefix + "mlp.proj.weight"] = state[prefix + "mlp.proj.weight"][:, chans]
