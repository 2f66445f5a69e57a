"""QLoRA's frozen base: the decoder layers' linear weights stored as torchao's NF4Tensor (4-bit NormalFloat).

As torchtune does: torchao's NF4Tensor is a tensor subclass that F.linear dequantizes block by block, on any
device (CPU included) and under FSDP2 (it shards and all-gathers its packed bytes). bitsandbytes would replace
the layers LoRA wraps by name with its own Linear4bit modules, built around its CUDA kernels. Only these linear
weights are 4-bit: the LoRA factors, the embeddings, the norms and the head stay in their dtype.
"""

from __future__ import annotations

import logging
import math

from torch import Tensor, nn

from ncal_core.errors import NCALError
from ncal_core.model.qwen import QwenModel

NF4_BLOCK = 64           # weights per absmax scale (QLoRA's)
NF4_SCALER_BLOCK = 256   # scales per double-quantized block (QLoRA's)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _nf4():
    """torchao's NF4 module, imported without its import-time noise: a line per GPU extension a CPU torch cannot
    load, and torch's note on each enum torchao registers with torch.compile."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


def _to_nf4(name: str, weight: Tensor, shards: int) -> Tensor:
    """weight [out, in] -> NF4, splittable into `shards` equal row blocks (FSDP2 shards each of its parts)."""
    blocks, rest = divmod(weight.numel(), NF4_BLOCK)
    if rest or blocks % shards or weight.shape[0] % shards:
        raise NCALError(f"--quantization nf4: {name} ({tuple(weight.shape)}) does not split into 4-bit blocks of "
                        f"{NF4_BLOCK} weights shared evenly by {shards} process(es)")
    # small layers: the largest scaler block that leaves every shard whole blocks of scales (QLoRA's 256 at most)
    return _nf4().to_nf4(weight, NF4_BLOCK, math.gcd(blocks // shards, NF4_SCALER_BLOCK))


def quantize_base(model: QwenModel, shards: int = 1) -> int:
    """Replace the decoder layers' frozen linear weights by NF4 copies in place; returns how many were replaced.

    Call after LoRA is injected (a LoRA layer keeps the base layer's `weight`), so the factors stay trainable.
    shards: the processes FSDP2 will shard the weights over.
    """
    replaced = 0
    for name, module in model.layers.named_modules():
        if name.rsplit(".", 1)[-1] not in LINEARS:
            continue
        if module.weight.requires_grad:
            raise ValueError(f"layers.{name}.weight trains: only a frozen base can be quantized")
        nf4 = _to_nf4(f"layers.{name}.weight", module.weight.detach(), shards)
        module.weight = nn.Parameter(nf4, requires_grad=False)
        replaced += 1
    return replaced


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, weights) of the model's NF4 tensors: the packed 4-bit codes plus their scales."""
    NF4Tensor = _nf4().NF4Tensor  # noqa: N806
    total = count = 0
    for p in model.parameters():
        if isinstance(p, NF4Tensor):
            inner = p.__tensor_flatten__()[0]
            total += sum(getattr(p, name).nbytes for name in inner)
            count += p.numel()
    return total, count


def dequantized(model: QwenModel) -> None:
    """Replace every NF4 weight by a plain tensor holding its dequantized values, in place (the reference tests
    compare a quantized model against)."""
    NF4Tensor = _nf4().NF4Tensor  # noqa: N806
    for module in model.layers.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, NF4Tensor):
            module.weight = nn.Parameter(weight.get_original_weight().to(weight.dtype), requires_grad=False)

