"""Hugging Face safetensors checkpoints: the name table, reading one tensor at a time, writing (sharded) files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ncal_core.durable import read_json, write_json
from ncal_core.errors import NCALError, at

# Only safetensors is read: a pytorch_model.bin is a pickle, and loading it could run code.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint key (everything but the LM head sits under `model.`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def checkpoint_files(directory: Path) -> tuple[list[Path], Path]:
    """The safetensors files of a checkpoint folder and the file that lists them (for error messages)."""
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single], single
    if not index.is_file():
        raise NCALError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise NCALError(f"{at(index, None, 'weight_map')}: missing or empty")
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise NCALError(f"{shard}: shard listed in {index} not found")
    return shards, index


def read_tensors(files: Iterable[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, key, tensor) one tensor at a time, so a large checkpoint is never whole in RAM."""
    for file in files:
        if not file.is_file():
            raise NCALError(f"{file}: file not found")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                    yield file, key, handle.get_tensor(key)
        except SafetensorError as err:
            raise NCALError(f"{file}: not a readable safetensors file ({err})") from None


def tensor_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header alone (no tensor is read)."""
    if not file.is_file():
        raise NCALError(f"{file}: file not found")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise NCALError(f"{file}: not a readable safetensors file ({err})") from None


def assign_parameters(
    model: nn.Module,
    tensors: Iterable[tuple[Path, str, torch.Tensor]],
    key_of: Callable[[str], str],
    *,
    source: Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    select: Callable[[str], bool] = lambda name: True,
    in_place: bool = False,
) -> None:
    """Replace every selected parameter of `model` (possibly on the meta device) with the checkpoint's tensor.

    `key_of` maps our parameter name to its checkpoint key. Tied parameters are filled once; a checkpoint
    copy under the tied alias's key is skipped, as transformers does. dtype/device None keep the parameter's.
    in_place copies into the parameters the model has (which an optimizer, a compiled graph or a wrapper may hold)
    instead of putting new ones in their place.
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if select(name):
            groups.setdefault(id(param), []).append(name)
    wanted = {key_of(names[0]): names for names in groups.values()}
    aliases = {key_of(name) for names in groups.values() for name in names[1:]}
    for file, key, tensor in tensors:
        if key in aliases:
            continue
        if key not in wanted:
            raise NCALError(f"{at(file, None, key)}: unexpected weight (the model has no such parameter)")
        names = wanted.pop(key)
        old = model.get_parameter(names[0])
        if tensor.shape != old.shape:
            raise NCALError(f"{at(file, None, key)}: shape {tuple(tensor.shape)}, the model needs {tuple(old.shape)}")
        if in_place:
            with torch.no_grad():
                old.copy_(tensor)
            continue
        new = nn.Parameter(
            tensor.to(device=device or old.device, dtype=dtype or old.dtype), requires_grad=old.requires_grad
        )
        for name in names:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, new)
    if wanted:
        missing = sorted(wanted)
        raise NCALError(f"{at(source, None, missing[0])}: weight missing ({len(missing)} missing in all)")


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    directory: Path,
    *,
    stem: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `{stem}.safetensors`, or numbered shards plus `{stem}.safetensors.index.json` past `max_shard_bytes`.

    Each shard is converted to `dtype` just before it is written, so only one shard is ever copied.
    Files of an earlier save under the same stem are removed first, so the folder never mixes two saves.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    for stale in directory.glob(f"{stem}-*-of-*.safetensors"):
        stale.unlink()

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (dtype or t.dtype).itemsize

    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + nbytes(tensor) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes(tensor)

    def write(keys: list[str], path: Path) -> None:
        part = {k: tensors[k].detach().to(device="cpu", dtype=dtype or tensors[k].dtype).contiguous() for k in keys}
        save_file(part, str(path), metadata={"format": "pt"})  # transformers refuses files without "format"

    if len(shards) == 1:
        write(shards[0], directory / f"{stem}.safetensors")
        return
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write(keys, directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(nbytes(t) for t in tensors.values())
    write_json(
        directory / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
