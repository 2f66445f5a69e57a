"""The Text-modality Collapse (TC) loss (METHOD.md section 2): pooled, norm-clamped features pushed towards an ETF.

Two steps the training loop calls apart (under DDP it all-gathers z between them):
`pool_features` (hidden states -> z) and `etf_gram_loss` (z -> scalar). Each runs in plain
PyTorch here or through the fused Triton kernels in `ncal_kernels`, which import lazily.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from torch import Tensor

from ncal_core.data.batching import Batch
from ncal_core.errors import NCALError

POOLINGS = ("last", "mean")
POOL_MODE = {"last": "last", "seq_last": "last", "mean": "mean"}
BACKENDS = ("auto", "triton", "torch")


def _triton_missing() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"the triton package cannot be imported ({err}; pip install triton)"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch': the TC path of a run on `device`, chosen once before training starts.

    auto takes Triton on CUDA GPUs of compute capability 8.0 or newer (the kernels' tile shapes and bf16 need
    Ampere), else PyTorch, with one warning on a GPU; an explicit triton that cannot run is an error.
    """
    if backend not in BACKENDS:
        raise NCALError(f"--tc_backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    missing = _triton_missing()
    if backend == "triton":
        if missing:
            raise NCALError(f"--tc_backend triton: {missing}")
        return "triton"
    major, minor = torch.cuda.get_device_capability(device)
    why = missing or (f"the GPU is sm_{major}{minor}, the Triton kernels need sm_80 or newer" if major < 8 else None)
    if why:
        warnings.warn(f"--tc_backend auto: {why}; the TC loss runs in PyTorch", stacklevel=2)
        return "torch"
    return "triton"


def pool_mask(batch: Batch, pooling: str) -> Tensor:
    """[B, T] bool: the tokens the TC feature may be pooled from (METHOD.md §2, step 1)."""
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    if pooling == "seq_last":
        return batch.attention_mask.bool()
    return positions.unsqueeze(0) < batch.prompt_lens.unsqueeze(1)


def _use_triton(backend: str, tensor: Tensor) -> bool:
    """Whether `backend` sends `tensor` through the Triton kernels."""
    if backend not in BACKENDS:
        raise NCALError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return tensor.is_cuda
    if backend == "torch":
        return False
    try:
        from ncal_kernels import etf_gram, pool_norm
        from ncal_kernels.spec import interpreted
    except ImportError as err:
        raise NCALError(f"backend='triton' needs the triton package ({err})") from err
    if not tensor.is_cuda and not all(interpreted(s.fn) for s in [*pool_norm.all_specs(), *etf_gram.all_specs()]):
        raise NCALError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the Triton kernels are imported"
        )
    return True


def _check_pool_inputs(hidden: Tensor, mask: Tensor, pooling: str, e_w: float, async_checks: bool) -> Tensor:
    """Validate pool_features' arguments; returns the marked-token mask [B, T] bool."""
    if pooling not in POOLINGS:
        raise NCALError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if not e_w > 0:
        raise NCALError(f"e_w must be > 0, got {e_w}")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise NCALError(f"hidden must be a float tensor [B, T, H], got {hidden.dtype} {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise NCALError(f"mask must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise NCALError(f"mask must be bool or integer, got {mask.dtype}")
    if hidden.numel() == 0:
        raise NCALError(f"hidden has no elements: {tuple(hidden.shape)}")
    marked = mask != 0
    _require(marked.any(1), "mask must mark at least one token in each batch row for pooling", async_checks)
    return marked


def _require(ok: Tensor, message: str, async_checks: bool) -> None:
    """Raise NCALError(message + the rows where ok [N] is False) unless ok is all True.

    With async_checks, off the CPU, it is a device-side assert instead, so a training step does not wait
    for the device here (a failure then is CUDA's fatal device-side assert, without the rows): for the
    training loop, whose rows were validated when they were read.
    """
    if ok.device.type == "cpu" or not async_checks:
        if not bool(ok.all()):
            raise NCALError(f"{message}; failing row(s): {(~ok).nonzero().flatten().tolist()}")
    else:
        torch._assert_async(ok.all(), message)


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _pool_torch(hidden: Tensor, marked: Tensor, pooling: str, e_w: float) -> Tensor:
    """Plain-PyTorch pooling and clamp: z [B, H] fp32 (fp64 for fp64 input)."""
    dtype = _compute_dtype(hidden)
    if pooling == "last":
        positions = torch.arange(marked.shape[1], device=marked.device)
        last = torch.where(marked, positions, -1).amax(1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(dtype)
    else:
        # where, not a product: unmarked (padding) states may be non-finite and must not reach the sum.
        kept = torch.where(marked[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        pooled = kept.sum(1, dtype=dtype) / marked.sum(1, keepdim=True)
    norm = torch.linalg.vector_norm(pooled, dim=1, keepdim=True)
    # e_w / max(||h||, e_w) is min(||h||, e_w) / ||h|| with no division by a zero norm (e_w > 0).
    return pooled * (e_w / torch.clamp_min(norm, e_w))


def pool_features(
    hidden: Tensor, mask: Tensor, pooling: str = "last", e_w: float = 1.0, backend: str = "auto",
    async_checks: bool = False,
) -> Tensor:
    """z [B, H] fp32: hidden [B, T, H] pooled ("last" or "mean") over the tokens mask [B, T] marks, clamped to e_w.

    async_checks: on an accelerator, check the mask's rows with a device-side assert (no host sync).
    """
    marked = _check_pool_inputs(hidden, mask, pooling, e_w, async_checks)
    if _use_triton(backend, hidden):
        from ncal_kernels.pool_norm import HIDDEN_DTYPES, pool_norm

        if hidden.dtype not in HIDDEN_DTYPES:
            raise NCALError(f"the Triton pooling kernel takes fp32, bf16 or fp16 hidden states, not {hidden.dtype}")
        return pool_norm(hidden, marked, pooling == "mean", float(e_w))
    return _pool_torch(hidden, marked, pooling, float(e_w))


def _gram_torch(z: Tensor, class_ids: Tensor, mu: float, class_diff: bool) -> Tensor:
    """Plain-PyTorch ETF Gram loss: scalar fp32 (fp64 for fp64 z)."""
    z = z.to(_compute_dtype(z))
    # G in fp32 even when the training step runs under bf16/fp16 autocast (of a device type that has one).
    kind = z.device.type
    with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext():
        gram = z @ z.T
    pairs = torch.ones_like(gram, dtype=torch.bool).triu(1)
    if class_diff:
        pairs = pairs & (class_ids[:, None] != class_ids[None, :])
    count = pairs.sum()
    # No masked pair: a sum over nothing, exactly 0 with a zero gradient, instead of 0/0.
    return torch.where(pairs, gram - mu, 0.0).square().sum() / count.clamp_min(1)


def etf_gram_loss(
    z: Tensor, class_ids: Tensor, num_classes: int, e_w: float = 1.0, class_diff: bool = True, backend: str = "auto",
    async_checks: bool = False,
) -> Tensor:
    """Scalar fp32: mean over masked pairs i < j of (z_i . z_j - mu)^2, mu = -e_w^2/(K-1); z [B, H], class_ids [B].

    async_checks: on an accelerator, check the class ids with a device-side assert (no host sync).
    """
    if num_classes < 2:
        raise NCALError(f"num_classes must be at least 2, got {num_classes}")
    if not e_w > 0:
        raise NCALError(f"e_w must be > 0, got {e_w}")
    if z.dim() != 2 or not z.is_floating_point() or z.shape[0] == 0:
        raise NCALError(f"z must be a float tensor [B, H] with B >= 1, got {z.dtype} {tuple(z.shape)}")
    if class_ids.shape != z.shape[:1] or class_ids.is_floating_point() or class_ids.dtype == torch.bool:
        raise NCALError(
            f"class_ids must be integer [B] = [{z.shape[0]}], got {class_ids.dtype} {tuple(class_ids.shape)}"
        )
    _require((class_ids >= 0) & (class_ids < num_classes),
             f"class_ids must lie in 0..{num_classes - 1}", async_checks)
    mu = -(float(e_w) ** 2) / (num_classes - 1)
    if _use_triton(backend, z):
        from ncal_kernels.etf_gram import etf_gram

        return etf_gram(z.float(), class_ids, mu, class_diff)
    return _gram_torch(z, class_ids, mu, class_diff)


def tc_loss(
    hidden: Tensor,
    mask: Tensor,
    class_ids: Tensor,
    num_classes: int,
    pooling: str = "last",
    e_w: float = 1.0,
    class_diff: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Scalar fp32 TC loss of hidden [B, T, H], mask [B, T], class_ids [B]: pool_features then etf_gram_loss."""
    z = pool_features(hidden, mask, pooling, e_w, backend)
    return etf_gram_loss(z, class_ids, num_classes, e_w, class_diff, backend)
