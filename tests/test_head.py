"""The label-only head: oneDNN's pre-packed weight gives lm_head's logits and input gradient, and steps aside
wherever it would not.

Tolerance (fp32): max |packed - plain| <= 1e-5 * max |plain|; oneDNN and MKL sum the H products in another
order (measured ~3e-7 relative).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ncal_core.model.head import LabelHead, packing_available, packing_pays

REL_TOL = 1e-5
needs_packing = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN packed linear")


def _frozen_head(vocab: int = 1000, hidden: int = 64) -> nn.Linear:
    head = nn.Linear(hidden, vocab, bias=False)
    nn.init.normal_(head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return head.requires_grad_(False)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() <= REL_TOL * b.abs().max()


@needs_packing
@pytest.mark.parametrize("rows", [1, 7, 64, 130])
def test_packed_head_gives_lm_heads_logits_and_input_gradient(rows: int) -> None:
    lm_head = _frozen_head()
    head = LabelHead(lm_head)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows), requires_grad=True)
    grad_out = torch.randn(rows, 1000, generator=torch.Generator().manual_seed(1))
    assert head.usable(x)

    ours = head(x)
    (ours * grad_out).sum().backward()
    ours_grad, x.grad = x.grad, None
    plain = lm_head(x)
    (plain * grad_out).sum().backward()
    _close(ours.detach(), plain.detach())
    _close(ours_grad, x.grad)
    assert ours.grad_fn is not None and "PackedHead" in type(ours.grad_fn).__name__  # the packed path ran


@needs_packing
def test_packs_follow_an_in_place_change_of_the_weight() -> None:
    lm_head = _frozen_head()
    head = LabelHead(lm_head)
    x = torch.randn(5, 64)
    head(x)
    with torch.no_grad():
        lm_head.weight.mul_(-2.0)  # as merging an update into a weight would
    _close(head(x), lm_head(x))


@pytest.mark.parametrize("case", ["weight trains", "bf16", "autocast", "not asked"])
def test_head_is_plain_lm_head_where_packing_does_not_apply(case: str) -> None:
    lm_head = _frozen_head()
    x = torch.randn(3, 64)
    if case == "weight trains":
        lm_head.weight.requires_grad_(True)
    if case == "bf16":
        lm_head, x = lm_head.bfloat16(), x.bfloat16()
    head = LabelHead(lm_head, pack=case != "not asked")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not head.usable(x)
        assert torch.equal(head(x), lm_head(x))
    if case == "weight trains":
        head(x).sum().backward()
        assert lm_head.weight.grad is not None


def test_head_refuses_a_biased_lm_head() -> None:
    with pytest.raises(ValueError, match="bias-free"):
        LabelHead(nn.Linear(4, 10))


@pytest.mark.parametrize(("hidden", "layers", "intermediate", "heads", "kv", "packs"), [
    (256, 4, 1024, 4, 2, True),     # the bench's small model with Qwen's vocabulary: the head is 91% of it
    (896, 24, 4864, 14, 2, False),  # Qwen2.5-0.5B: 28%, where the packs measured no faster and held 1.09 GB
])
def test_packing_is_asked_for_only_where_the_head_holds_most_of_the_weights(hidden, layers, intermediate, heads,
                                                                             kv, packs) -> None:
    from ncal_core.model.qwen import ModelConfig, QwenModel

    config = ModelConfig("qwen2", 151_936, hidden, intermediate, layers, heads, kv, hidden // heads, 1e6, 1e-6,
                         True, True, 4096)
    assert packing_pays(QwenModel(config, device="meta")) is packs
