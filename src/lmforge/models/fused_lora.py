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
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from torch.autograd.function import once_differentiable


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
        h = x2 @ lora_a.t()  # (N, r)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, out)
        y.addmm_(h, lora_b.t(), alpha=scaling)  # y += s · h Bᵀ, no (N, out) temporary
        ctx.save_for_backward(x2, h, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        g_h = (g @ lora_b).mul_(s)  # (N, r): d loss / d h
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g_h, lora_a).view(ctx.x_shape)  # (..., in)
        if ctx.needs_input_grad[3]:
            grad_a = g_h.t() @ x2  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(s)  # (out, r)
        return grad_x, None, None, grad_a, grad_b, None


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
        w, b = self.base_layer.weight, self.base_layer.bias
        a, bb, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return LoraMatmuls.apply(x, w, b, a, bb, s)
        # Autocast does not reach inside a Function's backward: cast as it would for F.linear
        # (weights and input to the autocast dtype; autograd casts the adapters' gradients
        # back to their fp32) and run the Function outside autocast.
        dt = torch.get_autocast_dtype(device)
        x, w, a, bb = x.to(dt), w.to(dt), a.to(dt), bb.to(dt)
        b = b.to(dt) if b is not None else None
        with torch.autocast(device, enabled=False):
            return LoraMatmuls.apply(x, w, b, a, bb, s)
