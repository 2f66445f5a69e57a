"""The Text-modality Collapse (TC) loss (METHOD.md section 2): pooled, norm-clamped features pushed towards an ETF.

`TCConfig` holds its settings, checked once and shared by the training objective, the loss and evaluation.
Two steps the training loop calls apart (under DDP it all-gathers z between them): `tc_features`
(hidden states -> z) and `tc_batch_loss` (z -> scalar). The operations under them, `pool_features` and
`etf_gram_loss`, run in plain PyTorch here or through the fused Triton kernels in `ncal_kernels`, which
import lazily. Their argument checks guard internal contracts (ValueError, with a traceback): what a user
can get wrong is refused earlier, by `TCConfig.check` and the readers of rows.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ncal_core.data.batching import Batch
from ncal_core.errors import NCALError

POOLINGS = ("last", "seq_last", "mean")  # where the feature is taken from: TCConfig.pooling
VARIANTS = ("pairs", "etf_target")
BACKENDS = ("auto", "triton", "torch")
_REDUCTION = {"last": "last", "seq_last": "last", "mean": "mean"}  # how pool_features reduces the marked tokens


@dataclass(frozen=True)
class TCConfig:
    """The settings of the TC loss and of the feature it is computed on."""

    pooling: str = "mean"    # last: the last prompt token; seq_last: the last real token; mean: the prompt's mean
    e_w: float = 1.0         # norm bound of the features
    class_diff: bool = True  # the Gram loss over pairs of different classes only (else all pairs)
    variant: str = "pairs"   # pairs: the paper's batch Gram loss; etf_target: regression to fixed ETF directions
    weight: float = 1.0      # lambda: the TC loss's weight beside the LM loss
    backend: str = "auto"    # auto, triton or torch (resolve_backend picks one for a device)

    def check(self) -> None:
        """Refuse a setting out of range with one line naming its flag."""
        for flag, value, allowed in (("pooling", self.pooling, POOLINGS), ("tc_variant", self.variant, VARIANTS),
                                     ("tc_backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise NCALError(f"--{flag}: must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {value!r}")
        if not self.e_w > 0:
            raise NCALError(f"--e_w: must be > 0, not {self.e_w}")
        if self.weight < 0:
            raise NCALError(f"--lambda_lc: must be >= 0, not {self.weight}")


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
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")  # TCConfig.check'd
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


def tc_features(hidden: Tensor, batch: Batch, tc: TCConfig, async_checks: bool = False) -> Tensor:
    """z [B, H] fp32: the TC feature of each row of a right-padded batch, from its hidden states [B, T, H]."""
    return pool_features(hidden, pool_mask(batch, tc.pooling), _REDUCTION[tc.pooling], e_w=tc.e_w,
                         backend=tc.backend, async_checks=async_checks)


def tc_batch_loss(z: Tensor, class_ids: Tensor, num_classes: int, tc: TCConfig, etf_targets: Tensor | None = None,
                  async_checks: bool = False) -> Tensor:
    """Scalar fp32 TC loss of features z [B, H] with class ids [B]: the Gram loss, or the etf_target variant's
    regression to `etf_targets` [K, H] (simplex_etf)."""
    if tc.variant == "etf_target":
        return etf_target_loss(z, class_ids, etf_targets)
    return etf_gram_loss(z, class_ids, num_classes, e_w=tc.e_w, class_diff=tc.class_diff, backend=tc.backend,
                         async_checks=async_checks)


def _use_triton(backend: str, tensor: Tensor) -> bool:
    """Whether `backend` sends `tensor` through the Triton kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return tensor.is_cuda
    if backend == "torch":
        return False
    try:
        from ncal_kernels import etf_gram, pool_norm
        from ncal_kernels.spec import interpreted
    except ImportError as err:
        raise RuntimeError(f"backend='triton' needs the triton package ({err})") from err
    if not tensor.is_cuda and not all(interpreted(s.fn) for s in [*pool_norm.all_specs(), *etf_gram.all_specs()]):
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the Triton kernels are imported"
        )
    return True


def _check_pool_inputs(hidden: Tensor, mask: Tensor, pooling: str, e_w: float, async_checks: bool) -> Tensor:
    """Validate pool_features' arguments; returns the marked-token mask [B, T] bool."""
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be last or mean, not {pooling!r}")
    if not e_w > 0:
        raise ValueError(f"e_w must be > 0, got {e_w}")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float tensor [B, T, H], got {hidden.dtype} {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"mask must be bool or integer, got {mask.dtype}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden has no elements: {tuple(hidden.shape)}")
    marked = mask != 0
    _require(marked.any(1), "mask must mark at least one token in each batch row for pooling", async_checks)
    return marked


def _require(ok: Tensor, message: str, async_checks: bool) -> None:
    """Raise ValueError(message + the rows where ok [N] is False) unless ok is all True.

    With async_checks, off the CPU, it is a device-side assert instead, so a training step does not wait
    for the device here (a failure then is CUDA's fatal device-side assert, without the rows): for the
    training loop, whose rows were validated when they were read.
    """
    if ok.device.type == "cpu" or not async_checks:
        if not bool(ok.all()):
            raise ValueError(f"{message}; failing row(s): {(~ok).nonzero().flatten().tolist()}")
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
            raise ValueError(f"the Triton pooling kernel takes fp32, bf16 or fp16 hidden states, not {hidden.dtype}")
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
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not e_w > 0:
        raise ValueError(f"e_w must be > 0, got {e_w}")
    if z.dim() != 2 or not z.is_floating_point() or z.shape[0] == 0:
        raise ValueError(f"z must be a float tensor [B, H] with B >= 1, got {z.dtype} {tuple(z.shape)}")
    if class_ids.shape != z.shape[:1] or class_ids.is_floating_point() or class_ids.dtype == torch.bool:
        raise ValueError(
            f"class_ids must be integer [B] = [{z.shape[0]}], got {class_ids.dtype} {tuple(class_ids.shape)}"
        )
    _require((class_ids >= 0) & (class_ids < num_classes),
             f"class_ids must lie in 0..{num_classes - 1}", async_checks)
    mu = -(float(e_w) ** 2) / (num_classes - 1)
    if _use_triton(backend, z):
        from ncal_kernels.etf_gram import etf_gram

        return etf_gram(z.float(), class_ids, mu, class_diff)
    return _gram_torch(z, class_ids, mu, class_diff)


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> Tensor:
    """[K, H] unit vectors with pairwise cosine -1/(K-1), in a random K-dimensional subspace (seeded)."""
    if dim < num_classes:
        raise NCALError(f"--tc_variant etf_target: a simplex ETF of {num_classes} classes needs hidden size >= {num_classes}, not {dim}")
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=gen, dtype=torch.float64))  # [H, K]
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    etf = (basis @ centred).T                                                                          # [K, H]
    return (etf / etf.norm(dim=1, keepdim=True)).float()


def etf_target_loss(z: Tensor, class_ids: Tensor, targets: Tensor) -> Tensor:
    """Dot regression to fixed ETF directions: mean_i 0.5 * (cos(z_i, w_{y_i}) - 1)^2. z [B, H], targets [K, H]."""
    unit = F.normalize(z, dim=1, eps=1e-12)
    cos = (unit * targets.to(device=z.device, dtype=z.dtype)[class_ids]).sum(dim=1)
    return 0.5 * (cos - 1.0).pow(2).mean()
