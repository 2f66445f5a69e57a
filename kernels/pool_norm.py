"""Pool each row's hidden states (last marked token, or mean over marked tokens) fused with the e_w norm clamp.

Both poolings are one weighted sum over a span of tokens: `last` is the span [p, p+1) of the last
marked token p with weight 1, `mean` is the span from the first to the last marked token, where
marked tokens weigh 1/n and the others 0. So one forward kernel serves both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ncal_kernels.spec import TRITON_TYPES, KernelSpec

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_T = 8
BLOCK_H = 256
SPREAD_BLOCK_T = 16


@triton.jit
def _pool_norm_fwd_kernel(
    hidden_ptr,
    mask_ptr,
    start_ptr,
    end_ptr,
    weight_ptr,
    z_ptr,
    norm_ptr,
    H,
    stride_hb,
    stride_ht,
    stride_mb,
    e_w,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row: z[row] = clamp(weight * sum of hidden[row, t] over marked t in [start, end)); norm[row] = ||pooled||."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + row)
    end = tl.load(end_ptr + row)
    weight = tl.load(weight_ptr + row)
    hidden_row = hidden_ptr + row * stride_hb
    z_row = z_ptr + row * H
    sumsq = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            in_span = ts < end
            marked = in_span & (tl.load(mask_ptr + row * stride_mb + ts, mask=in_span, other=0) != 0)
            # Unmarked tokens are never read: padding states may hold anything, even NaN.
            x = tl.load(
                hidden_row + ts.to(tl.int64)[:, None] * stride_ht + cols[None, :],
                mask=marked[:, None] & (cols[None, :] < H),
                other=0.0,
            )
            acc += tl.sum(x.to(tl.float32), axis=0)
        acc = acc * weight
        sumsq += acc * acc
        tl.store(z_row + cols, acc, mask=cols < H)
    norm = tl.sqrt(tl.sum(sumsq, axis=0))
    # e_w / max(||h||, e_w) is min(||h||, e_w) / ||h|| without dividing by a zero norm (e_w > 0).
    scale = e_w / tl.maximum(norm, e_w)
    # The second pass re-reads this program's own stores of the pooled row.
    tl.debug_barrier()
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        pooled = tl.load(z_row + cols, mask=cols < H, other=0.0)
        tl.store(z_row + cols, pooled * scale, mask=cols < H)
    tl.store(norm_ptr + row, norm)


@triton.jit
def _clamp_bwd_kernel(
    z_ptr,
    norm_ptr,
    weight_ptr,
    grad_z_ptr,
    grad_pooled_ptr,
    H,
    e_w,
    BLOCK_H: tl.constexpr,
):
    """One row: gradient w.r.t. the pooled state through the clamp, times the token weight, as fp32."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * H
    g_row = grad_z_ptr + row * H
    dots = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        z = tl.load(z_row + cols, mask=cols < H, other=0.0)
        g = tl.load(g_row + cols, mask=cols < H, other=0.0)
        dots += z * g
    norm = tl.load(norm_ptr + row)
    scale = e_w / tl.maximum(norm, e_w)
    # Clamped rows: dz/dh = (e_w/||h||)(I - u u^T) with u = h/||h|| = z/e_w.
    radial = tl.where(norm > e_w, tl.sum(dots, axis=0) / (e_w * e_w), 0.0)
    coef = scale * tl.load(weight_ptr + row)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        z = tl.load(z_row + cols, mask=cols < H, other=0.0)
        g = tl.load(g_row + cols, mask=cols < H, other=0.0)
        tl.store(grad_pooled_ptr + row * H + cols, coef * (g - radial * z), mask=cols < H)


@triton.jit
def _spread_bwd_kernel(
    grad_pooled_ptr,
    mask_ptr,
    start_ptr,
    end_ptr,
    grad_hidden_ptr,
    T,
    H,
    stride_mb,
    stride_gb,
    stride_gt,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One [BLOCK_T, H] slab of grad_hidden: the row's pooled gradient at marked tokens of the span, 0 elsewhere."""
    row = tl.program_id(0).to(tl.int64)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    start = tl.load(start_ptr + row)
    end = tl.load(end_ptr + row)
    in_row = ts < T
    in_span = in_row & (ts >= start) & (ts < end)
    marked = in_span & (tl.load(mask_ptr + row * stride_mb + ts, mask=in_span, other=0) != 0)
    out_row = grad_hidden_ptr + row * stride_gb + ts.to(tl.int64)[:, None] * stride_gt
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        g = tl.load(grad_pooled_ptr + row * H + cols, mask=cols < H, other=0.0)
        out = tl.where(marked[:, None], g[None, :], 0.0)
        tl.store(
            out_row + cols[None, :],
            out.to(grad_hidden_ptr.dtype.element_ty),
            mask=in_row[:, None] & (cols[None, :] < H),
        )


def fwd_spec(dtype: torch.dtype) -> KernelSpec:
    """The forward kernel for hidden states of `dtype`."""
    ptr = "*" + TRITON_TYPES[dtype]
    types = {
        "hidden_ptr": ptr,
        "mask_ptr": "*i8",
        "start_ptr": "*i32",
        "end_ptr": "*i32",
        "weight_ptr": "*fp32",
        "z_ptr": "*fp32",
        "norm_ptr": "*fp32",
        "H": "i32",
        "stride_hb": "i32",
        "stride_ht": "i32",
        "stride_mb": "i32",
        "e_w": "fp32",
    }
    return KernelSpec(_pool_norm_fwd_kernel, types, {"BLOCK_T": BLOCK_T, "BLOCK_H": BLOCK_H}, num_warps=4)


def clamp_bwd_spec() -> KernelSpec:
    """The clamp backward kernel (fp32 whatever the hidden dtype)."""
    types = {
        "z_ptr": "*fp32",
        "norm_ptr": "*fp32",
        "weight_ptr": "*fp32",
        "grad_z_ptr": "*fp32",
        "grad_pooled_ptr": "*fp32",
        "H": "i32",
        "e_w": "fp32",
    }
    return KernelSpec(_clamp_bwd_kernel, types, {"BLOCK_H": BLOCK_H}, num_warps=4)


def spread_bwd_spec(dtype: torch.dtype) -> KernelSpec:
    """The kernel writing grad_hidden of `dtype`."""
    types = {
        "grad_pooled_ptr": "*fp32",
        "mask_ptr": "*i8",
        "start_ptr": "*i32",
        "end_ptr": "*i32",
        "grad_hidden_ptr": "*" + TRITON_TYPES[dtype],
        "T": "i32",
        "H": "i32",
        "stride_mb": "i32",
        "stride_gb": "i32",
        "stride_gt": "i32",
    }
    return KernelSpec(_spread_bwd_kernel, types, {"BLOCK_T": SPREAD_BLOCK_T, "BLOCK_H": BLOCK_H}, num_warps=4)


def all_specs() -> list[KernelSpec]:
    """Every specialisation the launchers below can launch."""
    return [fwd_spec(d) for d in HIDDEN_DTYPES] + [clamp_bwd_spec()] + [spread_bwd_spec(d) for d in HIDDEN_DTYPES]


def token_spans(mask: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: first token, one past the last token, and the weight of a marked token. [B] int32, int32, fp32."""
    marked = mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(marked, positions, -1).amax(1)
    if not mean:
        return last.to(torch.int32), (last + 1).to(torch.int32), torch.ones(mask.shape[0], device=mask.device)
    first = torch.where(marked, positions, mask.shape[1]).amin(1)
    weight = 1.0 / marked.sum(1).to(torch.float32)
    return first.to(torch.int32), (last + 1).to(torch.int32), weight


def _check(hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden [B, T, H] and mask [B, T] expected, got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    if hidden.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} is not one of {HIDDEN_DTYPES}")


def pool_norm_forward(
    hidden: torch.Tensor,
    mask8: torch.Tensor,
    spans: tuple[torch.Tensor, ...],
    e_w: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: z [B, H] fp32 and the pooled norms [B] fp32."""
    B, _, H = hidden.shape
    z = torch.empty(B, H, device=hidden.device, dtype=torch.float32)
    norm = torch.empty(B, device=hidden.device, dtype=torch.float32)
    start, end, weight = spans
    fwd_spec(hidden.dtype).launch(
        (B,),
        hidden,
        mask8,
        start,
        end,
        weight,
        z,
        norm,
        H,
        hidden.stride(0),
        hidden.stride(1),
        mask8.stride(0),
        float(e_w),
    )
    return z, norm


def pool_norm_backward(
    grad_z: torch.Tensor,
    z: torch.Tensor,
    norm: torch.Tensor,
    mask8: torch.Tensor,
    spans: tuple[torch.Tensor, ...],
    e_w: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the two backward kernels: grad_hidden [B, T, H] of `dtype`, zero wherever pooling did not read."""
    B, T = mask8.shape
    H = z.shape[1]
    start, end, weight = spans
    grad_pooled = torch.empty_like(z)
    clamp_bwd_spec().launch((B,), z, norm, weight, grad_z.float().contiguous(), grad_pooled, H, float(e_w))
    grad_hidden = torch.empty(B, T, H, device=z.device, dtype=dtype)
    spread_bwd_spec(dtype).launch(
        (B, triton.cdiv(T, SPREAD_BLOCK_T)),
        grad_pooled,
        mask8,
        start,
        end,
        grad_hidden,
        T,
        H,
        mask8.stride(0),
        grad_hidden.stride(0),
        grad_hidden.stride(1),
    )
    return grad_hidden


class PoolNormFunction(torch.autograd.Function):
    """Autograd wrapper: differentiable w.r.t. hidden only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask: torch.Tensor, mean: bool, e_w: float) -> torch.Tensor:
        _check(hidden, mask)
        # The kernel steps through H with unit stride; B and T may have any strides.
        hidden = hidden if hidden.stride(2) == 1 else hidden.contiguous()
        mask8 = (mask != 0).to(torch.int8)
        spans = token_spans(mask, mean)
        z, norm = pool_norm_forward(hidden, mask8, spans, e_w)
        ctx.save_for_backward(z, norm, mask8, *spans)
        ctx.e_w = e_w
        ctx.dtype = hidden.dtype
        return z

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        z, norm, mask8, *spans = ctx.saved_tensors
        return pool_norm_backward(grad_z, z, norm, mask8, spans, ctx.e_w, ctx.dtype), None, None, None


def pool_norm(hidden: torch.Tensor, mask: torch.Tensor, mean: bool, e_w: float) -> torch.Tensor:
    """z [B, H] fp32: hidden [B, T, H] pooled over mask [B, T] (last marked token, or mean if `mean`), clamped."""
    return PoolNormFunction.apply(hidden, mask, mean, e_w)
