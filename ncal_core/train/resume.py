"""What a resumed run must share with the run that saved the checkpoint, and the RNG streams it takes back.

A checkpoint resumes exactly only with the same model, adapter, data order and global batch: its optimizer
state has the adapter's shapes, and its data position counts micro-batches of the saved global batch. Flags
that would break that are refused; flags that only change the schedule (learning rate, epochs) are honoured
and said.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ncal_core.errors import NCALError
from ncal_core.train.config import TrainConfig
from ncal_core.train.state import TrainState

# flags a resumed run must keep; the global batch (batch x processes x accumulation) is checked as a product
FIXED_ON_RESUME = ("model_name_or_path", "use_lora", "lora_r", "lora_alpha", "target_modules", "dataset_path",
                   "seed", "resample", "resample_epochs", "pooling", "head", "tiny_hidden_size", "tiny_num_layers",
                   "tiny_vocab_size", "tiny_tied_embeddings", "fsdp", "quantization")
SAID_ON_RESUME = ("learning_rate", "num_train_epochs", "max_steps")


def resume_settings(cfg: TrainConfig, world: int, lr: float) -> dict[str, Any]:
    """What a checkpoint records of its run (lr: the peak learning rate in effect), for the next resume to compare."""
    settings = {name: getattr(cfg, name) for name in FIXED_ON_RESUME + SAID_ON_RESUME}
    settings["learning_rate"] = lr
    settings["world_size"] = world
    settings["global_batch"] = cfg.per_device_train_batch_size * world * cfg.gradient_accumulation_steps
    return settings


def saved_world_size(state: TrainState, rng: dict[str, torch.Tensor]) -> int:
    """The number of processes that saved a checkpoint (older checkpoints: told by their per-rank RNG keys)."""
    if state.run and "world_size" in state.run:
        return int(state.run["world_size"])
    ranks = {key.rsplit(".rank", 1)[1] for key in rng if ".rank" in key}
    return max(1, len(ranks))


def check_resume(cfg: TrainConfig, world: int, lr: float, state: TrainState, rng: dict[str, torch.Tensor],
                 checkpoint: Path) -> list[str]:
    """Refuse, in one line, a resume that cannot continue the saved run; returns lines saying what changes."""
    saved_world = saved_world_size(state, rng)
    if saved_world != world:
        raise NCALError(f"--resume_from_checkpoint {checkpoint}: saved by {saved_world} process(es), resumed with "
                        f"{world}; resume with {saved_world} (the data position and the per-process RNG streams "
                        "belong to that number)")
    saved = state.run
    if saved is None:  # a checkpoint written before runs recorded their settings: nothing more to compare
        return []
    now = resume_settings(cfg, world, lr)
    for name in (*FIXED_ON_RESUME, "global_batch"):
        if name in saved and saved[name] != now[name]:
            flag = name if name != "global_batch" else \
                "per_device_train_batch_size (x processes x gradient_accumulation_steps)"
            raise NCALError(f"--{flag}: the checkpoint {checkpoint} was trained with {saved[name]!r}, this run "
                            f"asks for {now[name]!r}; resume with the same value or start a new run")
    return [f"resuming with --{name} {now[name]} (the checkpoint's run had {saved[name]})"
            for name in SAID_ON_RESUME if name in saved and saved[name] != now[name]]


def rng_state() -> dict[str, torch.Tensor]:
    """This process's generator states: the CPU's and one per visible GPU."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def rank_rng(saved: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's states out of a checkpoint's (several processes save theirs with a `.rank<r>` suffix)."""
    if world == 1:
        return {key: value for key, value in saved.items() if ".rank" not in key}
    suffix = f".rank{rank}"
    mine = {key.removesuffix(suffix): value for key, value in saved.items() if key.endswith(suffix)}
    if "torch" not in mine:
        raise AssertionError(f"checkpoint RNG has no state for rank {rank} although world sizes match")
    return mine


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore rng_state()'s states; GPUs in device order (cuda10 after cuda9, not after cuda1)."""
    torch.set_rng_state(state["torch"])
    cuda = sorted((int(key[len("cuda"):]), value) for key, value in state.items() if key.startswith("cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([value for _, value in cuda])
