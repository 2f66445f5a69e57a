"""silu_mul against autograd's F.silu(gate) * up: the same values and gradients bit for bit, one [N, I] tensor
fewer kept for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ncal_core.model.qwen import MLP, ModelConfig
from ncal_core.model.swiglu import silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_autograd_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    gate = torch.randn(37, 129, dtype=dtype, requires_grad=True)
    up = torch.randn(37, 129, dtype=dtype, requires_grad=True)
    weight = torch.randn(37, 129, dtype=dtype)
    expected = F.silu(gate) * up
    (expected * weight).sum().backward()
    grads = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    ours = silu_mul(gate, up)
    (ours * weight).sum().backward()
    assert torch.equal(ours, expected)
    assert torch.equal(gate.grad, grads[0]) and torch.equal(up.grad, grads[1])


def test_only_one_input_needing_a_gradient() -> None:
    gate, up = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    silu_mul(gate, up).sum().backward()
    reference = gate.detach().clone().requires_grad_()
    (F.silu(reference) * up).sum().backward()
    assert torch.equal(gate.grad, reference.grad)


def saved_storages(fn) -> list[tuple[int, ...]]:
    """Shapes of the distinct storages autograd saves while fn() runs (parameters included)."""
    seen: dict[int, tuple[int, ...]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


def test_the_mlp_keeps_two_intermediate_tensors_not_three() -> None:
    config = ModelConfig("qwen2", vocab_size=32, hidden_size=16, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, attention_bias=True, max_position_embeddings=64)
    mlp = MLP(config).requires_grad_(False)  # frozen, as under LoRA on the attention projections
    x = torch.randn(11, 16, requires_grad=True)
    wide = [shape for shape in saved_storages(lambda: mlp(x)) if shape == (11, 48)]
    assert len(wide) == 2  # gate and up; autograd alone also keeps silu(gate)
