"""The ETF Gram loss: mean over masked pairs i < j of (z_i . z_j - mu)^2, with tl.dot tiles of Z Z^T.

The forward also writes the symmetric residual D_ij = m_ij (G_ij - mu) (B x B fp32), so the
backward is one tiled product: dL/dZ = (2/P) D Z (METHOD.md section 3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ncal_kernels.spec import KernelSpec

# Forward tiles (BLOCK_B, BLOCK_K, num_warps, num_stages): the smallest BLOCK_B covering B is launched
# (tl.dot needs edges of at least 16). Chosen with bench_kernels.py --compile-only: no spills on sm_80
# and sm_90 with or without 16-byte-aligned arguments; the 64 tile spills with one stage on sm_90 when
# aligned, and with 4 warps or BLOCK_K=32 it needs 200+ registers.
FWD_TILES = ((16, 32, 4, 2), (32, 32, 4, 2), (64, 16, 8, 2))
# Backward tile (BLOCK_M rows of dZ, BLOCK_H columns, BLOCK_K over the batch), one for every B.
BWD_BLOCK_M, BWD_BLOCK_H, BWD_BLOCK_K, BWD_WARPS = 32, 64, 16, 8


@triton.jit
def _gram_fwd_kernel(
    z_ptr,
    class_ptr,
    resid_ptr,
    loss_part_ptr,
    count_part_ptr,
    B,
    H,
    mu,
    CLASS_DIFF: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One tile (i, j >= i) of G = Z Z^T: residuals into resid (and its mirror), partial loss and pair count."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    # G is symmetric: the tiles below the diagonal are the mirror stores of the ones above.
    if pid_j < pid_i:
        return
    rows = pid_i * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_j * BLOCK_B + tl.arange(0, BLOCK_B)
    gram = tl.zeros([BLOCK_B, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        zi = tl.load(z_ptr + rows[:, None] * H + ks[None, :], mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0)
        zj = tl.load(z_ptr + cols[:, None] * H + ks[None, :], mask=(cols[:, None] < B) & (ks[None, :] < H), other=0.0)
        # "ieee": the spec wants G in fp32; tf32 would cost ~1e-3 relative on every entry.
        gram = tl.dot(zi, tl.trans(zj), gram, input_precision="ieee")
    inside = (rows[:, None] < B) & (cols[None, :] < B)
    pair = inside & (rows[:, None] != cols[None, :])
    if CLASS_DIFF:
        yi = tl.load(class_ptr + rows, mask=rows < B, other=-1)
        yj = tl.load(class_ptr + cols, mask=cols < B, other=-1)
        pair = pair & (yi[:, None] != yj[None, :])
    resid = tl.where(pair, gram - mu, 0.0)
    tl.store(resid_ptr + rows[:, None] * B + cols[None, :], resid, mask=inside)
    # The diagonal tile already holds both halves; mirroring it would race on the same addresses.
    # (Written as a tensor test: the interpreter rejects a scalar bool in a store mask.)
    off_diagonal = rows[:, None] < pid_j * BLOCK_B
    tl.store(resid_ptr + cols[None, :] * B + rows[:, None], resid, mask=inside & off_diagonal)
    upper = pair & (rows[:, None] < cols[None, :])
    part = pid_i * tl.num_programs(1) + pid_j
    tl.store(loss_part_ptr + part, tl.sum(tl.sum(tl.where(upper, resid * resid, 0.0), axis=1), axis=0))
    tl.store(count_part_ptr + part, tl.sum(tl.sum(upper.to(tl.int32), axis=1), axis=0))


@triton.jit
def _gram_bwd_kernel(
    resid_ptr,
    z_ptr,
    scale_ptr,
    grad_z_ptr,
    B,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_H] tile of dL/dZ = scale * D Z, with scale = 2 * grad_loss / P."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, B, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(
            resid_ptr + rows[:, None] * B + ks[None, :], mask=(rows[:, None] < B) & (ks[None, :] < B), other=0.0
        )
        z = tl.load(z_ptr + ks[:, None] * H + cols[None, :], mask=(ks[:, None] < B) & (cols[None, :] < H), other=0.0)
        acc = tl.dot(d, z, acc, input_precision="ieee")
    scale = tl.load(scale_ptr)
    tl.store(
        grad_z_ptr + rows[:, None] * H + cols[None, :], acc * scale, mask=(rows[:, None] < B) & (cols[None, :] < H)
    )


def fwd_tile(batch: int) -> tuple[int, int, int, int]:
    """The forward tile launched for `batch` rows."""
    return next((t for t in FWD_TILES if t[0] >= batch), FWD_TILES[-1])


def fwd_spec(tile: tuple[int, int, int, int], class_diff: bool) -> KernelSpec:
    """The forward kernel for one of FWD_TILES and a pair mode."""
    block_b, block_k, warps, stages = tile
    types = {
        "z_ptr": "*fp32",
        "class_ptr": "*i32",
        "resid_ptr": "*fp32",
        "loss_part_ptr": "*fp32",
        "count_part_ptr": "*i32",
        "B": "i32",
        "H": "i32",
        "mu": "fp32",
    }
    consts = {"CLASS_DIFF": int(class_diff), "BLOCK_B": block_b, "BLOCK_K": block_k}
    return KernelSpec(_gram_fwd_kernel, types, consts, num_warps=warps, num_stages=stages)


def bwd_spec() -> KernelSpec:
    """The backward kernel."""
    types = {
        "resid_ptr": "*fp32",
        "z_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "grad_z_ptr": "*fp32",
        "B": "i32",
        "H": "i32",
    }
    consts = {"BLOCK_M": BWD_BLOCK_M, "BLOCK_H": BWD_BLOCK_H, "BLOCK_K": BWD_BLOCK_K}
    return KernelSpec(_gram_bwd_kernel, types, consts, num_warps=BWD_WARPS)


def all_specs() -> list[KernelSpec]:
    """Every specialisation the launchers below can launch."""
    return [fwd_spec(t, d) for t in FWD_TILES for d in (False, True)] + [bwd_spec()]


def gram_forward(z: torch.Tensor, class_ids: torch.Tensor, mu: float, class_diff: bool) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel: loss (0-dim fp32), residuals D [B, B] fp32, pair count P (0-dim int)."""
    if z.dim() != 2 or z.dtype != torch.float32 or not z.is_contiguous() or class_ids.shape != z.shape[:1]:
        raise ValueError(f"z [B, H] contiguous fp32 and class_ids [B] expected, got {tuple(z.shape)} {z.dtype}")
    B, H = z.shape
    tile = fwd_tile(B)
    tiles = triton.cdiv(B, tile[0])
    resid = torch.empty(B, B, device=z.device, dtype=torch.float32)
    # Tiles below the diagonal return without writing their partials, hence zeros.
    loss_part = torch.zeros(tiles * tiles, device=z.device, dtype=torch.float32)
    count_part = torch.zeros(tiles * tiles, device=z.device, dtype=torch.int32)
    fwd_spec(tile, class_diff).launch(
        (tiles, tiles), z, class_ids.to(torch.int32), resid, loss_part, count_part, B, H, float(mu)
    )
    count = count_part.sum()
    # No masked pair: the partials are all 0, so the loss is exactly 0 and P is taken as 1.
    return loss_part.sum() / count.clamp_min(1), resid, count


def gram_backward(grad_loss: torch.Tensor, z: torch.Tensor, resid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: dL/dZ [B, H] fp32."""
    B, H = z.shape
    scale = (2.0 * grad_loss.float() / count.clamp_min(1)).reshape(1)
    grad_z = torch.empty_like(z)
    bwd_spec().launch((triton.cdiv(B, BWD_BLOCK_M), triton.cdiv(H, BWD_BLOCK_H)), resid, z, scale, grad_z, B, H)
    return grad_z


class EtfGramFunction(torch.autograd.Function):
    """Autograd wrapper: differentiable w.r.t. z only."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, class_ids: torch.Tensor, mu: float, class_diff: bool) -> torch.Tensor:
        loss, resid, count = gram_forward(z, class_ids, mu, class_diff)
        ctx.save_for_backward(z, resid, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        z, resid, count = ctx.saved_tensors
        return gram_backward(grad_loss, z, resid, count), None, None, None


def etf_gram(z: torch.Tensor, class_ids: torch.Tensor, mu: float, class_diff: bool) -> torch.Tensor:
    """Scalar fp32: mean over masked pairs i < j of (z_i . z_j - mu)^2; z [B, H] fp32, class_ids [B]."""
    return EtfGramFunction.apply(z.contiguous(), class_ids, mu, class_diff)
