"""The Mamba blocks' norms over the last dimension, RMSNorm and LayerNorm, as Triton kernels.

PyTorch's RMSNorm path for a bf16 input under autocast is five to seven
kernels: a cast to fp32, the fused norm, a cast back, and in the backward pass
both casts again and two reductions, one of them (``GammaBetaBackward``, the
weight gradient) about 5x slower than the bytes it reads at DPMamba-M's
training shapes; LayerNorm's backward has the same weight-gradient reduction
(H100, ``benchmarks/results/norms_2026-11-25_h100/``). Here the forward
pass is one kernel that reads the input in its own dtype and computes in fp32,
and the backward pass one kernel that also sums the weight (and bias)
gradients over its rows, plus a fixed-order sum of one partial row per program
(deterministic, no atomics). The input is what the backward pass keeps, with
one fp32 ``1 / std`` per row; LayerNorm's mean is recomputed from it.
"""

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from speechbrain_mamba.ops.grad_mode import needs_autograd
from speechbrain_mamba.ops.triton_support import cdiv, interpreting, next_power_of_2

# Widest row the kernels take in one tile (DPMamba's 64-256, SepMamba's up to 1024 channels).
MAX_FEATURES = 8192
# Elements per program and tile: rows per tile = this / the row's padded width (at least 1).
_TILE_ELEMENTS = 4096


@triton.jit
def _centred(x, mask, N, CENTER: tl.constexpr):
    """``x`` minus its row mean (LayerNorm) or ``x`` itself (RMSNorm); zeros where ``mask`` is false (for
    RMSNorm because the loads fill masked elements with zeros)."""
    if CENTER:
        x = tl.where(mask, x - (tl.sum(x, axis=1) / N)[:, None], 0.0)
    return x


@triton.jit
def _norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, rstd_ptr, M, T, N, sx_b, sx_t, eps,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CENTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                     STORE_RSTD: tl.constexpr):
    """``y = (x - mean) / std * w + b`` (without ``mean`` and ``b`` for RMSNorm) for ``BLOCK_M`` rows;
    row ``r`` of ``x`` is ``(r // T, r % T)``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x_rows = (rows64 // T) * sx_b + (rows64 % T) * sx_t
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = _centred(x, mask, N, CENTER)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, M, T, N,
                     sx_b, sx_t, sdy_b, sdy_t, tiles_per_program,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CENTER: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``dx`` of ``tiles_per_program`` tiles of rows and their share of ``dw`` (and ``db``), summed in
    registers and stored as this program's partial rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for tile in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        batch, time = rows64 // T, rows64 % T
        x = tl.load(x_ptr + (batch * sx_b + time * sx_t)[:, None] + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + (batch * sdy_b + time * sdy_t)[:, None] + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = _centred(x.to(tl.float32), mask, N, CENTER) * rstd[:, None]
        dy = dy.to(tl.float32)
        w_dy = dy * w[None, :]
        # d/dx of (x - mean) * rstd: rstd (w dy - mean(w dy) - x_hat mean(x_hat w dy)); RMSNorm has no
        # mean(w dy) term.
        grad_x_hat = w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=1) / N)[:, None]
        if CENTER:
            grad_x_hat -= (tl.sum(w_dy, axis=1) / N)[:, None]
        dx = grad_x_hat * rstd[:, None]
        tl.store(dx_ptr + rows64[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        if HAS_BIAS:
            db += dy
    tl.store(dw_part_ptr + pid * N + cols, tl.sum(dw, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * N + cols, tl.sum(db, axis=0), mask=col_mask)


def _rows(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """``t`` as ``(batch, T, N)`` with unit feature stride (a copy only if no such view exists), and its
    ``T`` and two row strides."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() > 3:
        # Leading dims merge into the batch dim when their strides allow, else reshape copies.
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    if t.dim() == 2:
        t = t.unsqueeze(0)
    return t, t.shape[1], t.stride(0), t.stride(1)


def _tile(features: int) -> Tuple[int, int, int]:
    """Rows per tile, padded row width and warps per program: about ``_TILE_ELEMENTS`` elements per tile,
    and more warps for rows wider than a tile so that each thread holds at most 64 elements per tensor."""
    block_n = next_power_of_2(features)
    return max(1, _TILE_ELEMENTS // block_n), block_n, max(4, min(16, block_n // 512))


# Most fp32 elements of the backward kernel's partial rows (one per program, for dw and again for db): 16 MiB.
_PARTIAL_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=None)
def _backward_programs(device_index: int, features: int) -> int:
    """Most programs of the backward kernel: 32 per SM, enough to keep the SMs busy (one tile each at
    DPMamba-M's 4 s shapes; 4 per SM, each looping over several tiles, made the fp32 RMSNorm pass 1.3-1.5x
    PyTorch's time there), fewer for wide rows so that the partial rows stay within 16 MiB."""
    if interpreting():
        return 4
    per_sm = 32 * torch.cuda.get_device_properties(device_index).multi_processor_count
    return max(1, min(per_sm, _PARTIAL_ELEMENTS // features))


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, center: bool,
             out_dtype: torch.dtype, store_rstd: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, 1 / std per row, or an empty tensor without ``store_rstd``)."""
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if not x.numel():
        return y, torch.empty(0, dtype=torch.float32, device=x.device)
    features = x.shape[-1]
    rows, T, sx_b, sx_t = _rows(x)
    M = rows.shape[0] * T
    rstd = torch.empty(M if store_rstd else 0, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _tile(features)
    _norm_fwd_kernel[(cdiv(M, block_m),)](
        rows, weight, weight if bias is None else bias, y, rstd, M, T, features, sx_b, sx_t, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, CENTER=center, HAS_BIAS=bias is not None, STORE_RSTD=store_rstd,
        num_warps=num_warps,
    )
    return y, rstd


def _backward(x: torch.Tensor, weight: torch.Tensor, has_bias: bool, rstd: torch.Tensor, dy: torch.Tensor,
              center: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dx in ``x``'s dtype, dw in fp32, db in fp32 or None)."""
    features = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    if not x.numel():
        return dx, torch.zeros(features, **f32), torch.zeros(features, **f32) if has_bias else None
    rows, T, sx_b, sx_t = _rows(x)
    dy_rows, _, sdy_b, sdy_t = _rows(dy)  # the same shape as x: the same rows
    M = rows.shape[0] * T
    block_m, block_n, num_warps = _tile(features)
    tiles = cdiv(M, block_m)
    tiles_per_program = cdiv(tiles, min(_backward_programs(x.device.index or 0, features), tiles))
    programs = cdiv(tiles, tiles_per_program)
    dw_part = torch.empty(programs, features, **f32)
    db_part = torch.empty(programs if has_bias else 0, features, **f32)
    _norm_bwd_kernel[(programs,)](
        rows, weight, dy_rows, rstd, dx, dw_part, db_part, M, T, features, sx_b, sx_t, sdy_b, sdy_t,
        tiles_per_program, BLOCK_M=block_m, BLOCK_N=block_n, CENTER=center, HAS_BIAS=has_bias,
        num_warps=num_warps,
    )
    return dx, dw_part.sum(0), db_part.sum(0) if has_bias else None


class _TritonNorm(torch.autograd.Function):
    """Autograd wrapper: keeps ``x`` itself (no fp32 copy), the weight and ``1 / std`` per row."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, center, out_dtype):
        y, rstd = _forward(x, weight, bias, eps, center, out_dtype, store_rstd=True)
        ctx.save_for_backward(x, weight, rstd)
        ctx.center, ctx.has_bias = center, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: raise rather than drop a term
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw, db = _backward(x, weight, ctx.has_bias, rstd, dy, ctx.center)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, dw.to(weight.dtype) if needs[1] else None,
                db.to(ctx.bias_dtype) if needs[2] else None, None, None, None)


def _check(x: torch.Tensor, *parameters: Optional[torch.Tensor]) -> None:
    """What only the kernels need: the device, the parameters beside ``x``, the row width."""
    if not x.is_cuda and not interpreting():
        raise ValueError(f"the Triton norms run on CUDA tensors only (or under TRITON_INTERPRET=1); "
                         f"x is on {x.device}.")
    for parameter in parameters:
        if parameter is not None and parameter.device != x.device:
            raise ValueError(f"the norm's parameters are on {parameter.device} but x is on {x.device}.")
    if not 1 <= x.shape[-1] <= MAX_FEATURES:
        raise ValueError(f"the Triton norms take 1 to {MAX_FEATURES} features; x has {x.shape[-1]}.")


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, center: bool,
          out_dtype: torch.dtype) -> torch.Tensor:
    """Either norm, through autograd when a gradient is needed. The kernels read the parameters with unit
    stride: a strided view is copied (differentiably)."""
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not needs_autograd(x, weight, bias):
        return _forward(x, weight, bias, float(eps), center, out_dtype, store_rstd=False)[0]
    return _TritonNorm.apply(x, weight, bias, float(eps), center, out_dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton implementation of :func:`speechbrain_mamba.ops.norm.rms_norm` (shapes checked there).

    Arguments
    ---------
    x : torch.Tensor
        ``(..., N)``, ``N <= MAX_FEATURES``; read in place when its last dimension is contiguous.
    weight : torch.Tensor
        ``(N,)``.
    eps : float
        Added to the mean square.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``, contiguous.

    Example
    -------
    >>> x = torch.randn(2, 100, 256, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> rms_norm_triton(x, torch.ones(256, device="cuda"), 1e-5).dtype  # doctest: +SKIP
    torch.bfloat16
    """
    _check(x, weight)
    return _norm(x, weight, None, eps, False, x.dtype)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                      out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton implementation of :func:`speechbrain_mamba.ops.norm.layer_norm` (shapes checked there).

    Arguments
    ---------
    x, weight
        As for :func:`rms_norm_triton`.
    bias : torch.Tensor, optional
        ``(N,)``.
    eps : float
        Added to the variance.
    out_dtype : torch.dtype, optional
        The output's dtype (default: ``x``'s).

    Returns
    -------
    torch.Tensor
        Same shape as ``x``, contiguous.

    Example
    -------
    >>> x = torch.randn(2, 100, 256, device="cuda")  # doctest: +SKIP
    >>> layer_norm_triton(x, torch.ones(256, device="cuda"), None, 1e-5).shape  # doctest: +SKIP
    torch.Size([2, 100, 256])
    """
    _check(x, weight, bias)
    return _norm(x, weight, bias, eps, True, out_dtype or x.dtype)


__all__ = ["MAX_FEATURES", "layer_norm_triton", "rms_norm_triton"]
