"""The LM head at the few positions the objective needs, with a pre-packed weight on the CPU.

At those positions the head is a skinny matmul: a few dozen rows against every vocabulary row
([M, H] x [H, V], then [M, V] x [V, H] for the input gradient). With Qwen's 151,936 rows, MKL spends
such a call mostly on the weight, not the arithmetic (8 rows take 18 ms where 20 rows take 21 ms: it
re-packs the weight every call); a frozen weight packed once into oneDNN's blocked layout, a copy for
each of the two products, is reused instead (measured on 2 CPU threads, 16-25 rows, H = 256: forward
21 -> 6 ms, input gradient 15 -> 6 ms). The packs cost two more copies of the weight and are remade
whenever the weight changes in place. Elsewhere (a GPU, another dtype, a weight that trains, autocast,
a torch without oneDNN) it is lm_head itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# the row count oneDNN tunes the packed layout for; 16, 64 and 256 measured alike at 20 and at 80 rows
PACK_ROWS = 64
# Packing pays where the head is most of the model. Measured with LoRA on 2 CPU threads: at hidden 256 with Qwen's
# 151,936 rows (the head 91% of the weights) the packs take a head call from 21 to 6 ms; at Qwen2.5-0.5B's shapes
# (the head 28%) the objective's forward + backward took 2,197 ms packed against 2,171 unpacked, while the two
# packs held 1.09 GB.
PACK_SHARE = 0.5


def packing_available() -> bool:
    """Whether this torch has oneDNN and the packed-linear ops (torch.compile's frozen-weight path uses them)."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") \
        and hasattr(ops, "_linear_pointwise")


def packing_pays(model: nn.Module) -> bool:
    """Whether the model's lm_head holds more than PACK_SHARE of its weights (a tied head counted once)."""
    total = sum(p.numel() for p in model.parameters())
    return model.lm_head.weight.numel() > PACK_SHARE * total


def _packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    """x [M, in] -> [M, out], packed from a weight [out, in]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class _PackedHead(torch.autograd.Function):
    """logits = x W^T with W frozen: forward and input gradient each on their own packed copy of W."""

    @staticmethod
    def forward(ctx, x: Tensor, forward_pack: Tensor, backward_pack: Tensor) -> Tensor:
        ctx.backward_pack = backward_pack  # not an input that needs grad: no reference cycle
        return _packed_linear(x, forward_pack)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _packed_linear(grad.contiguous(), ctx.backward_pack), None, None


class LabelHead:
    """The model's bias-free lm_head on a [M, H] set of positions; packs a frozen fp32 CPU weight once.

    A plain object, not a module: it owns no parameters, and reads lm_head.weight at every call.
    """

    def __init__(self, lm_head: nn.Linear, pack: bool = True) -> None:
        if lm_head.bias is not None:
            raise ValueError("LabelHead takes a bias-free lm_head, as Qwen's")
        self.lm_head = lm_head
        self.pack = pack and packing_available()
        self._packs: tuple[tuple, Tensor, Tensor] | None = None

    def usable(self, x: Tensor) -> bool:
        """Whether the packed path gives this call the plain F.linear's result (to fp32 rounding)."""
        w = self.lm_head.weight
        return (self.pack and w.device.type == "cpu" and x.device.type == "cpu" and w.dtype == torch.float32
                and x.dtype == torch.float32 and not w.requires_grad and not torch.is_autocast_enabled("cpu"))

    def packs(self) -> tuple[Tensor, Tensor]:
        """The forward and backward packs of the weight as it is now (re-packed after an in-place change)."""
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._packs is None or self._packs[0] != key:
            self._packs = None  # free the old packs before making new ones
            with torch.no_grad():
                forward = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
                backward = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), PACK_ROWS)
            self._packs = (key, forward, backward)
        return self._packs[1], self._packs[2]

    def __call__(self, x: Tensor) -> Tensor:
        """x [M, H] -> logits [M, V]"""
        if not self.usable(x):
            return self.lm_head(x)
        return _PackedHead.apply(x.contiguous(), *self.packs())
