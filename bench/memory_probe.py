"""`python -m ncal_core.train` with its memory taken phase by phase: the child bench/memory_profile.py runs.

    python -m bench.memory_probe OUT.json TRAIN_FLAGS...

The run is ncal_core.train's own, unchanged: four of the loop's functions are wrapped, not rewritten
(`load_model` in setup; `setup`, `train_step` and `finish` in the loop). Phases: the imports; loading the
weights; the rest of setup; each optimizer step, split where the backward first reads a tensor the forward
saved; the end of the run (the development and test evaluations, saving).
Each phase records the process's RSS after it and its high-water mark during it (Linux's VmHWM, reset
before each phase through /proc/self/clear_refs), anonymous and file-backed apart. During each step the
tensors autograd saves for the backward are summed (each storage once; parameters apart, since they are
counted as weights). After the last step glibc's malloc_trim shows how much freed memory the allocator
still held. Linux only.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ncal_core.train.loop as loop
import ncal_core.train.setup as setup_module
from ncal_core.cli import parse_config
from ncal_core.train.config import TrainConfig

MIB = 2**20
FIELDS = {"VmRSS": "rss_mb", "VmHWM": "peak_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}


def status() -> dict[str, float]:
    """This process's RSS, its high-water mark since the last reset, and RSS's anonymous and file parts, MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[FIELDS[key]] = int(rest.split()[0]) / 1024  # kB
    return values


def reset_peak() -> None:
    """Start VmHWM again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


class SavedTensors:
    """torch.autograd.graph.saved_tensors_hooks that sum what the forward saves, each storage once, and note
    the moment the backward first unpacks one (the end of the forward)."""

    def __init__(self, parameter_storages: set[int], on_backward: Callable[[], None]):
        self.parameters = parameter_storages
        self.on_backward = on_backward
        self.storages: dict[int, int] = {}
        self.parameter_bytes = 0
        self.backward_started = False

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.storages:
            self.storages[key] = storage.nbytes()
            if key in self.parameters:
                self.parameter_bytes += storage.nbytes()
        return tensor

    def unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.backward_started:
            self.backward_started = True
            self.on_backward()
        return tensor

    @property
    def activation_bytes(self) -> int:
        return sum(self.storages.values()) - self.parameter_bytes


class Probe:
    """The phases' records, filled by the wrappers as the run goes."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"imports": status(), "steps": []}
        self.parameter_storages: set[int] = set()

    def wrap_load_model(self, load_model: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            reset_peak()
            model = load_model(*args, **kwargs)
            self.report["load_weights"] = status()
            self.report["weights"] = {"parameters": sum(p.numel() for p in model.parameters()),
                                      "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
            reset_peak()
            return model
        return wrapped

    def wrap_setup(self, setup: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(cfg: TrainConfig) -> Any:
            reset_peak()
            run = setup(cfg)
            self.report["rest_of_setup"] = status()  # its peak since the weights were loaded
            params = list(run.model.parameters())
            self.parameter_storages = {p.untyped_storage().data_ptr() for p in params}
            trainable = [p for p in params if p.requires_grad]
            self.report["trainable"] = {"parameters": sum(p.numel() for p in trainable),
                                        "bytes": sum(p.numel() * p.element_size() for p in trainable)}
            return run
        return wrapped

    def wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(parts: Any, group: list[list[int]], since_log: Any) -> Any:
            record: dict[str, Any] = {"before": status()}

            def forward_done() -> None:
                record["forward"] = status()
                reset_peak()

            saved = SavedTensors(self.parameter_storages, forward_done)
            reset_peak()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = train_step(parts, group, since_log)
            record["backward_and_update"] = status()
            record.update(rows=out.rows - since_log.rows, tokens=out.tokens - since_log.tokens,
                          saved_activation_mb=saved.activation_bytes / MIB,
                          saved_parameter_mb=saved.parameter_bytes / MIB)
            self.report["steps"].append(record)
            return out
        return wrapped

    def wrap_finish(self, finish: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            reset_peak()
            out = finish(*args, **kwargs)
            self.report["finish"] = status()
            return out
        return wrapped


def malloc_trim() -> dict[str, float]:
    """RSS before and after glibc returns the free memory it holds to the system."""
    before = status()["rss_mb"]
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {"rss_before_mb": before, "rss_after_mb": status()["rss_mb"]}


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    probe = Probe()
    setup_module.load_model = probe.wrap_load_model(setup_module.load_model)
    loop.setup = probe.wrap_setup(loop.setup)
    loop.train_step = probe.wrap_train_step(loop.train_step)
    loop.finish = probe.wrap_finish(loop.finish)
    loop.train(parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], prog="memory_probe.py"))
    probe.report["malloc_trim"] = malloc_trim()
    out.write_text(json.dumps(probe.report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
