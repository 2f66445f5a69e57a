"""silu(gate) * up with a backward that keeps two [N, I] tensors instead of three.

Autograd keeps gate (for silu's backward), silu(gate) and up (for the product's): 3 * I values per token and
layer, the largest share of a decoder layer's activations (at Qwen2.5-0.5B's shapes, I = 4,864 against
H = 896). This function keeps gate and up and recomputes silu(gate) in the backward with the same kernels
autograd runs (silu, then silu_backward), so its values and gradients are bitwise those of
`F.silu(gate) * up`, for a third less MLP memory and one extra elementwise pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, keeping only gate and up for the backward."""
    return SiluMul.apply(gate, up)
