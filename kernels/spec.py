"""One compiled variant of a Triton kernel, shared by the launchers and the compile-only benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction

TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "i8",
    torch.int32: "i32",
}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel, the argument types it is launched with, its constexprs and its launch options."""

    fn: Any
    types: dict[str, str]
    constexprs: dict[str, int]
    num_warps: int
    num_stages: int = 2

    @property
    def name(self) -> str:
        """The kernel and its specialisation, e.g. `_gram_fwd_kernel[BLOCK_B=64,BLOCK_K=32]`."""
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        dtypes = ",".join(sorted({t[1:] for t in self.types.values() if t.startswith("*")}))
        return f"{self.fn.__name__}[{consts};{dtypes}]"

    def signature(self) -> dict[str, str]:
        """Every argument in order, typed as `triton.compile` wants it (`*bf16`, `i32`, `fp32`, `constexpr`)."""
        return {arg: self.types.get(arg, "constexpr") for arg in self.fn.arg_names}

    def launch(self, grid: tuple[int, ...], *args: Any) -> None:
        """Launch with positional runtime arguments, after checking them against this spec's types."""
        names = [a for a in self.fn.arg_names if a in self.types]
        if len(args) != len(names):
            raise ValueError(f"{self.name}: {len(args)} arguments for {len(names)} parameters")
        for name, value in zip(names, args, strict=True):
            want = self.types[name]
            if isinstance(value, torch.Tensor) and want != "*" + TRITON_TYPES[value.dtype]:
                raise ValueError(f"{self.name}: {name} is {value.dtype}, the spec says {want}")
        self.fn[grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def interpreted(kernel: Any) -> bool:
    """Whether a kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1 when it was defined)."""
    return isinstance(kernel, InterpretedFunction)
