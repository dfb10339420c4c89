"""The LoRA step's matmuls, fused: one autograd Function per adapted Linear with a frozen base.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: three
autograd nodes and two extra passes over the (N, out) output (the scaling multiply and the
add), and in backward the same again (the multiply's gradient, and the sum of the two
gradients of ``x``). Measured on the fine-tune bench (Llama 4 x 512, fp32, 2 cores) those
elementwise passes were 13 % of the step. ``FusedLoraLinear`` is peft's own layer class (peft
still does the surgery, merging, saving and every variant) whose forward, in the plain case
(one active adapter, no DoRA or other variant, no dropout, a frozen ``nn.Linear`` base),
calls ``LoraMatmuls`` instead:

    forward   y = x Wᵀ + b;  h = x Aᵀ;  y += s · h Bᵀ          (the add inside the GEMM)
    backward  g_h = s · g B;  dx = g W + g_h A;  dA = g_hᵀ x;  dB = s · gᵀ h

It saves only x and the rank-r h (the frozen W never gets a gradient, so nothing is saved
for one). Every other case runs peft's forward unchanged. Same maths as peft to float
rounding (tests/models/test_lora.py compares outputs and gradients).

A SwiGLU MLP's down projection goes one step further (``SwiGLUDownLora``, called through
``FusedLoraLinear.gated_forward``): it takes the gate and up outputs and forms their product
inside, so autograd saves only those two (N, d_ff) tensors; the eager chain keeps four (gate,
silu(gate), up, and their product, the down projection's input). Backward rebuilds silu(gate)
and the product, two elementwise passes beside the step's matmuls. Measured on the fine-tune
bench (Llama 4 x 512, d_ff 1376, batch 8 x 256, fp32): 86 of the step's 391 MiB peak. The
same trade as Liger Kernel's SwiGLU on GPUs; unsloth does it as well.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from torch.autograd.function import once_differentiable


def _lora_forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, in) → y = x2 Wᵀ + b + s · h Bᵀ (N, out) and h = x2 Aᵀ (N, r), saved for dB."""
    h = x2 @ lora_a.t()
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(h, lora_b.t(), alpha=scaling)  # y += s · h Bᵀ, no (N, out) temporary
    return y, h


def _output_grads(
    grad_y: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d y as (N, out), and d loss / d h (N, r) = s · g B."""
    g = grad_y.reshape(-1, grad_y.shape[-1])
    return g, (g @ lora_b).mul_(scaling)


def _input_grad(
    g: torch.Tensor, g_h: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor
) -> torch.Tensor:
    """d loss / d x2 = g W + g_h A, (N, in)."""
    return (g @ weight).addmm_(g_h, lora_a)


class LoraMatmuls(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ with W, b frozen; A (r, in) and B (out, r) trainable."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """x: (..., in); weight: (out, in); bias: (out,) or None → y: (..., out)."""
        x2 = x.reshape(-1, x.shape[-1])  # (N, in), a view when x is contiguous
        y, h = _lora_forward(x2, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x2, h, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g, g_h = _output_grads(grad_y, lora_b, s)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(g, g_h, weight, lora_a).view(ctx.x_shape)  # (..., in)
        if ctx.needs_input_grad[3]:
            grad_a = g_h.t() @ x2  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(s)  # (out, r)
        return grad_x, None, None, grad_a, grad_b, None


class SwiGLUDownLora(torch.autograd.Function):
    """y = LoraMatmuls(silu(gate) · up) without saving silu(gate) or the product."""

    @staticmethod
    def forward(
        ctx: Any,
        gate: torch.Tensor,
        up: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """gate, up: (..., d_ff); weight: (out, d_ff) → y: (..., out)."""
        g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
        x2 = F.silu(g2).mul_(u2)  # (N, d_ff), freed when forward returns
        y, h = _lora_forward(x2, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(g2, u2, h, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shape = gate.shape
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g2, u2, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g, g_h = _output_grads(grad_y, lora_b, s)
        grad_a = grad_b = grad_gate = grad_up = None
        if ctx.needs_input_grad[5]:
            grad_b = (g.t() @ h).mul_(s)  # (out, r)
        # At most two (N, d_ff) buffers beside the saved gate and up: silu(gate), then the
        # product (freed after grad_a), then grad_x; grad_up reuses silu's, grad_gate grad_x's.
        silu = F.silu(g2)
        if ctx.needs_input_grad[4]:
            grad_a = g_h.t() @ (silu * u2)  # (r, d_ff): the product, rebuilt for this matmul
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = _input_grad(g, g_h, weight, lora_a)  # (N, d_ff): d loss / d product
            if ctx.needs_input_grad[1]:
                grad_up = silu.mul_(grad_x).view(ctx.shape)
            del silu
            if ctx.needs_input_grad[0]:  # the op autograd's SiLU node calls, same rounding
                grad_gate = torch.ops.aten.silu_backward.grad_input(
                    grad_x.mul_(u2), g2, grad_input=grad_x
                ).view(ctx.shape)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear; its plain case runs ``LoraMatmuls`` (see the module docstring)."""

    def _fusable(self) -> str | None:
        """The active adapter when the fused path computes exactly peft's maths, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if (
            name not in self.lora_A
            or name in self.lora_variant  # DoRA and the other variants
            or not isinstance(self.lora_dropout[name], nn.Identity)
            or self.lora_B[name].bias is not None
            or type(base) is not nn.Linear
            or self.fan_in_fan_out
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
        ):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs else self._fusable()
        if name is None:
            return super().forward(x, *args, **kwargs)
        return self._apply_fused(LoraMatmuls, name, x)

    def gated_forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``self(F.silu(gate) * up)``, saving only ``gate`` and ``up`` for backward
        (``SwiGLUDownLora``) when the fused path applies. Called by ``SwiGLUMLP``."""
        name = self._fusable()
        if name is None:
            return self(F.silu(gate) * up)
        return self._apply_fused(SwiGLUDownLora, name, gate, up)

    def _apply_fused(self, fn: type[torch.autograd.Function], name: str, *x: torch.Tensor):
        w, b = self.base_layer.weight, self.base_layer.bias
        a, bb, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        device = x[0].device.type
        if not torch.is_autocast_enabled(device):
            return fn.apply(*x, w, b, a, bb, s)
        # Autocast does not reach inside a Function's backward: cast as it would for F.linear
        # (weights and input to the autocast dtype; autograd casts the adapters' gradients
        # back to their fp32) and run the Function outside autocast.
        dt = torch.get_autocast_dtype(device)
        x = tuple(t.to(dt) for t in x)
        w, a, bb = w.to(dt), a.to(dt), bb.to(dt)
        b = b.to(dt) if b is not None else None
        with torch.autocast(device, enabled=False):
            return fn.apply(*x, w, b, a, bb, s)
