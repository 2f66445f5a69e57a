"""QLoRA's NF4 base (ncal_core.model.quantize) against the dequantized base and an independent NF4 reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from random_checkpoints import make_hf_checkpoint
from torch import nn

from ncal_core.errors import NCALError
from ncal_core.model.lora import inject_lora, is_lora_param
from ncal_core.model.quantize import NF4_BLOCK, dequantized, nf4_bytes, quantize_base
from ncal_core.model.qwen import load_model
from ncal_core.train.config import TrainConfig

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="needs torchao (pip install 'ncal[qlora]')")

# QLoRA's NormalFloat4 code book (Dettmers et al. 2023, appendix E)
NF4_CODES = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])

# (dtype, rtol of the loss, atol of the LoRA gradients): the NF4 layer dequantizes and runs F.linear on the
# same values as the dequantized model, so only the order of bf16 roundings may differ
TOLERANCES = [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1e-2, 2e-2)]


def reference_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Round-trip through NF4 without double quantization: per block of 64, the nearest code times the absmax."""
    blocks = weight.float().reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    codes = (blocks / absmax).unsqueeze(-1).sub(NF4_CODES).abs().argmin(dim=-1)
    return (NF4_CODES[codes] * absmax).reshape(weight.shape)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("nf4") / "base", hidden_size=64, intermediate_size=128,
                              layers=2, heads=4, kv_heads=2, attention_bias=True)


def lora_model(base, dtype: torch.dtype) -> nn.Module:
    model = load_model(base, dtype=dtype)
    torch.manual_seed(0)
    inject_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # B = 0 would hide a wrong gradient through A
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def loss_and_lora_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model.lm_head(model(ids[:, :-1])).float()
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if is_lora_param(n)}


@needs_torchao
@pytest.mark.parametrize(("dtype", "loss_rtol", "grad_atol"), TOLERANCES)
def test_nf4_base_gives_the_dequantized_base_loss_and_lora_gradients(base, dtype, loss_rtol, grad_atol):
    quantized = lora_model(base, dtype)
    assert quantize_base(quantized) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    reference = lora_model(base, dtype)  # the same LoRA factors (seeded)
    quantize_base(reference)
    dequantized(reference)  # plain tensors holding the NF4 values
    assert nf4_bytes(reference) == (0, 0) and nf4_bytes(quantized)[1] > 0
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    loss_q, grads_q = loss_and_lora_grads(quantized, ids)
    loss_r, grads_r = loss_and_lora_grads(reference, ids)
    assert loss_q.item() == pytest.approx(loss_r.item(), rel=loss_rtol)
    assert grads_q.keys() == grads_r.keys() and len(grads_q) == 2 * 3 * 2
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_r[name], rtol=0, atol=grad_atol)
    # the frozen base stays frozen, and nothing but the LoRA factors has a gradient
    assert all(p.grad is None for n, p in quantized.named_parameters() if not is_lora_param(n))


@needs_torchao
def test_nf4_weights_round_like_an_independent_nf4_reference(base):
    model = load_model(base).requires_grad_(False)
    original = {n: m.weight.detach().clone() for n, m in model.layers.named_modules() if n.endswith("proj")}
    quantize_base(model)
    dequantized(model)
    for name, weight in original.items():
        ours = dict(model.layers.named_modules())[name].weight
        ref = reference_nf4(weight)
        scale = weight.abs().reshape(-1, NF4_BLOCK).amax(dim=1).repeat_interleave(NF4_BLOCK).reshape(weight.shape)
        # torchao stores the block scales in 8 bits (double quantization): a value next to the midpoint of two
        # codes may round to the other one; the rest agree to the scales' rounding
        close = (ours - ref).abs() <= 0.01 * scale
        assert close.float().mean() >= 0.99, name
        assert ((ours - ref).abs() <= 0.3 * scale).all(), name  # never further than one code step


@needs_torchao
def test_nf4_base_takes_about_half_a_byte_a_weight():
    """One decoder layer's linears at Qwen2.5-0.5B's shapes: 4-bit codes, an 8-bit scale per 64, an fp32 scale
    per 256 of those: 0.5 + 1/64 + 4/16384 = 0.516 bytes a weight against bf16's 2."""
    layer = nn.Module()
    layer.layers = nn.ModuleDict({"q_proj": nn.Linear(896, 896), "k_proj": nn.Linear(896, 128),
                                  "gate_proj": nn.Linear(896, 4864), "down_proj": nn.Linear(4864, 896)})
    layer.requires_grad_(False)
    weights = sum(m.weight.numel() for m in layer.layers.values())
    quantize_base(layer)
    nbytes, count = nf4_bytes(layer)
    assert count == weights
    assert 0.5 <= nbytes / count <= 0.52
    print(f"NF4 base: {nbytes / count:.4f} bytes a weight ({weights:,} weights)")


@needs_torchao
def test_a_weight_that_cannot_split_over_the_processes_is_refused():
    layer = nn.Module()
    layer.layers = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False)})  # one block of 64
    layer.requires_grad_(False)
    with pytest.raises(NCALError, match=r"--quantization nf4: layers.q_proj.weight \(\(8, 8\)\) does not split"):
        quantize_base(layer, shards=2)
    assert quantize_base(layer, shards=1) == 1


@pytest.mark.parametrize(("flags", "message"), [
    ({"quantization": "int8"}, "--quantization: must be none or nf4, not 'int8'"),
    ({"quantization": "nf4", "use_lora": False}, "--quantization: a quantized base is frozen"),
])
def test_quantization_flags_are_checked(flags, message):
    with pytest.raises(NCALError, match=message):
        TrainConfig(model_name_or_path="some/model", **flags).check()


def test_nf4_without_torchao_says_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(NCALError, match=r"--quantization: nf4 needs torchao \(pip install 'ncal\[qlora\]'\)"):
        TrainConfig(model_name_or_path="some/model", quantization="nf4").check()
