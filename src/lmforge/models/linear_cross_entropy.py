"""The output head and the next-token cross-entropy in one chunked pass: no (N, vocab) logits.

In a LoRA step the logits dominate memory: ``lm_head`` writes (B·T, V) logits, the loss saves
an fp32 log-softmax of the same size for backward, and backward builds two more (N, V)
gradients (measured on the fine-tune bench, fp32, V = 8192: 192 of the step's 561 MiB peak).
``LinearCrossEntropy`` computes, one chunk of rows at a time, the chunk's logits, their
log-sum-exp, the loss, and already the gradient of the loss with respect to the hidden states
(and to the head's weight when it trains): the loss is the last op of the step, so its
gradient is known in forward up to the incoming scalar (Liger Kernel's fused linear
cross-entropy does the same on GPUs). Saved for backward: an (N, d) gradient instead of
(N, V) tensors; the head's matmuls are the same two it always costs (logits, and the
gradient to the hidden states), nothing is recomputed.

Hand-written because the libraries that do this (Liger Kernel, Apple's cut-cross-entropy)
are Triton/CUDA only; torchtune's chunked loss still materialises every logit chunk's
log-softmax for autograd.

``head_in_loss(model)`` puts it on a ``Decoder`` for the length of a ``fit``: the head then
returns its input hidden states while the model trains with gradients on, and
``head_loss_sum`` (the ``LossFn`` to pass to ``fit``) applies the head inside the loss.
Evaluation and generation (eval mode or ``no_grad``) get ordinary logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# Rows per chunk: a chunk's fp32 logits about 8 MiB (cache-sized work for the exp/sum passes),
# and at least 128 rows so the head's matmul stays efficient with big vocabularies.
CHUNK_BYTES = 8 * 2**20
MIN_ROWS = 128


def chunk_rows(rows: int, vocab: int) -> int:
    return max(1, min(rows, max(MIN_ROWS, CHUNK_BYTES // (4 * vocab))))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy (nats, fp32) of ``hidden @ weight.T`` against ``targets``.

    Every exp and sum runs in fp32; the logits are computed in ``hidden``'s dtype (bf16 under
    autocast, as ``F.linear`` would), so the loss equals ``token_loss_sum(F.linear(h, W), y)``
    to float rounding. Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
    ) -> torch.Tensor:
        """hidden: (N, d); weight: (V, d) in hidden's dtype; targets: (N,) int → loss ()."""
        N, V = hidden.shape[0], weight.shape[0]
        rows = chunk_rows(N, V)
        keep = targets != ignore_index
        safe = targets.masked_fill(~keep, 0)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, N, rows):
            h = hidden[i : i + rows]  # (n, d)
            z = (h @ weight.t()).float()  # (n, V) fp32: the one work buffer
            t, k = safe[i : i + rows, None], keep[i : i + rows, None]  # (n, 1)
            z_target = z.gather(1, t)  # (n, 1)
            m = z.amax(dim=-1, keepdim=True)
            m.masked_fill_(m.isinf(), 0.0)  # as torch.logsumexp: all -inf or +inf rows
            e = z.sub_(m).exp_()  # in place: exp(z - max)
            total = e.sum(dim=-1, keepdim=True)  # (n, 1)
            loss += torch.where(k, total.log() + m - z_target, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d z = softmax(z) - one_hot(target) on counted rows, 0 on ignored ones
            g = e.mul_(k / total).scatter_add_(1, t, -k.float())  # (n, V)
            g = g.to(hidden.dtype)  # the dtype the head's backward matmuls run in
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[i : i + rows])
            if grad_weight is not None:
                grad_weight.addmm_(g.t().float(), h.float())
            del z, e, g
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        one = bool(grad_loss == 1)  # the usual case: the gradients are final as saved
        if grad_hidden is not None and not one:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight if one else grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, int]:
    """``token_loss_sum(F.linear(hidden, weight, bias), targets)`` without the logits.

    hidden: (B, T, d) or (N, d); targets: (B, T) or (N,). Returns (summed loss in nats, the
    number of counted targets). Under autocast the head runs in the autocast dtype."""
    if bias is not None:
        raise ValueError("linear_cross_entropy_sum: heads with a bias are not supported")
    h = hidden.reshape(-1, hidden.shape[-1])
    device = h.device.type
    if torch.is_autocast_enabled(device):  # cast as autocast would for F.linear
        dt = torch.get_autocast_dtype(device)
        h, weight = h.to(dt), weight.to(dt)
    else:
        weight = weight.to(h.dtype)
    with torch.autocast(device, enabled=False):
        loss = LinearCrossEntropy.apply(h, weight, targets.reshape(-1), ignore_index)
    return loss, int((targets != ignore_index).sum())


class HeadInLoss(nn.Module):
    """Stands in for a Decoder's ``lm_head`` while ``head_in_loss`` is active: the same weight
    (the same ``lm_head.weight`` key in checkpoints), but while training with gradients on it
    returns its input (B, T, d): the loss applies the head. Otherwise ordinary logits."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight  # the Parameter itself (tied to tok_emb when it is)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return x
        return F.linear(x, self.weight)


@contextlib.contextmanager
def head_in_loss(model: nn.Module) -> Iterator[Any]:
    """Within the block, ``model(x)`` in training returns hidden states and the yielded
    ``LossFn`` computes the loss with ``model``'s head fused in. Yields None (nothing changed)
    when the head is not a plain bias-free ``nn.Linear`` (a LoRA-adapted or quantised head)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        yield None
        return
    stand_in = HeadInLoss(head)
    model.lm_head = stand_in

    def loss_fn(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return linear_cross_entropy_sum(hidden, stand_in.weight, targets)

    try:
        yield loss_fn
    finally:
        model.lm_head = head
