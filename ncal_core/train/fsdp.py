"""FSDP2 for `--fsdp true`: each decoder layer, then the objective around them, sharded with PyTorch's fully_shard.

The layers are sharded one by one (each gathers its weights for its own forward and backward, then frees them),
then the root (embeddings, final norm, head) as torchtune does. Gradients are averaged over ranks as under DDP,
so the loss scaling and the TC all-gather of `train/step.py` hold unchanged. Checkpoints keep their format: the
weights are consolidated on the main process into the usual safetensors; the optimizer state, the part that is
too large for one process, is written by every rank into `optimizer/` through torch.distributed.checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ncal_core.loss.objective import TrainingObjective
from ncal_core.model.lora import WEIGHTS_FILE, is_lora_param, peft_key
from ncal_core.model.weights import checkpoint_files, hf_name, read_tensors

OPTIMIZER_FOLDER = "optimizer"  # torch.distributed.checkpoint's files in a checkpoint: one per rank + .metadata


def shard_objective(objective: TrainingObjective, device: torch.device, bf16: bool) -> None:
    """fully_shard every decoder layer, then the objective (the root), over all ranks of the process group.

    bf16 (--bf16), or a half-precision base under fp32 LoRA factors (which FSDP2 cannot gather together as they are):
    FSDP2's mixed precision, half-precision weights in forward and backward, gradients reduced in fp32.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtypes = {p.dtype for p in objective.parameters()}
    half = torch.bfloat16 if bf16 else next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    for layer in objective.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(objective, mesh=mesh, mp_policy=policy)
    # the head's oneDNN pack is keyed on the weight's storage, which FSDP2 frees and reuses at every step
    objective.head.pack = False


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def set_gradient_sync(objective: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients at this micro-batch's backward (the last of a step) or keep them local."""
    objective.set_requires_gradient_sync(sync)


@contextmanager
def unsharded_root(objective: nn.Module) -> Iterator[None]:
    """The root's weights (embeddings, final norm, head) gathered, for code that calls the model outside the
    objective's forward (evaluation); the layers gather their own in their forward."""
    if not is_sharded(objective):
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def full_weights(model: nn.Module, only_trainable: bool) -> dict[str, Tensor]:
    """Every rank: the model's full weights by parameter name, on the CPU of the main process ({} elsewhere).

    only_trainable: just the trainable ones (the LoRA factors), which is all an adapter checkpoint holds."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in weights.items() if not only_trainable or name in trainable}


def load_full_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Every rank: full weights by parameter name (some of them, e.g. only the LoRA factors) into the shards."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def save_optimizer(objective: nn.Module, optimizer: torch.optim.Optimizer, folder: Path | None) -> None:
    """Every rank: its shard of the optimizer state into folder/optimizer; folder is the main process's (the
    others pass None and are sent it)."""
    box = [str(folder) if folder is not None else None]
    dist.broadcast_object_list(box, src=0)
    dcp.save(get_optimizer_state_dict(objective, optimizer), checkpoint_id=Path(box[0]) / OPTIMIZER_FOLDER)


def load_optimizer(objective: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank: its shard of the optimizer state back from folder/optimizer."""
    state = get_optimizer_state_dict(objective, optimizer)
    dcp.load(state, checkpoint_id=folder / OPTIMIZER_FOLDER)
    set_optimizer_state_dict(objective, optimizer, state)


def read_weights(model: nn.Module, folder: Path, use_lora: bool) -> dict[str, Tensor]:
    """A checkpoint folder's trainable weights (the adapter's factors, or every weight) by our parameter name."""
    if use_lora:
        names = {peft_key(name): name for name, _ in model.named_parameters() if is_lora_param(name)}
        files = [folder / WEIGHTS_FILE]
    else:
        names = {hf_name(name): name for name, _ in model.named_parameters()}
        files = checkpoint_files(folder)[0]
    # peft saves without the adapter name, but some tools keep it (as load_adapter_weights reads them)
    tensors = ((key.replace(".default.", "."), t) for _, key, t in read_tensors(files))
    return {names[key]: t for key, t in tensors if key in names}
