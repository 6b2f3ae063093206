"""The Mamba blocks' norms over the last dimension (RMSNorm, LayerNorm) and the dual-path norm over a whole
sample (``GroupNorm(1, C)``, optionally fused with the residual sum that follows it), as Triton kernels.

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

The single-group norm normalises each sample over all its channels and
positions, so its statistics need the whole sample: each pass is two kernels,
one writing per-program partials (the count, mean and sum of squared deviations
of its tiles, merged by Chan's formula; for the backward pass the two sums the
input gradient needs and partial rows of the parameter gradients), one merging
them in a fixed order and normalising (the residual added before the one
rounding). PyTorch's path is about ten kernels forward, several of them over
the whole activation, and more backward.
"""

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from speechbrain_mamba.ops.grad_mode import needs_autograd
from speechbrain_mamba.ops.triton_support import cdiv, interpreting, next_power_of_2, sm_count

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
    per_sm = 32 * sm_count(device_index)
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


def _check(x: torch.Tensor, *parameters: Optional[torch.Tensor], features_dim: int = -1) -> None:
    """What only the kernels need: the device, the parameters beside ``x``, the width of the rows (the size of
    ``features_dim``)."""
    if not x.is_cuda and not interpreting():
        raise ValueError(f"the Triton norms run on CUDA tensors only (or under TRITON_INTERPRET=1); "
                         f"x is on {x.device}.")
    for parameter in parameters:
        if parameter is not None and parameter.device != x.device:
            raise ValueError(f"the norm's parameters are on {parameter.device} but x is on {x.device}.")
    if not 1 <= x.shape[features_dim] <= MAX_FEATURES:
        raise ValueError(f"the Triton norms take 1 to {MAX_FEATURES} features; x has {x.shape[features_dim]}.")


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


# ---------------------------------------------------------------- single-group norm (GroupNorm(1, C))
# A sample [C, P1, P2] is read through its four strides; position p is (p // P2, p % P2).


@triton.jit
def _sample_tile(ptr, sample, positions, cols, mask, P2, s_b, s_c, s_1, s_2):
    """The ``(BLOCK_P, BLOCK_C)`` tile of ``positions`` x ``cols`` of ``sample``, in fp32 (0 where masked)."""
    offsets = sample * s_b + (positions // P2) * s_1 + (positions % P2) * s_2
    return tl.load(ptr + offsets[:, None] + cols[None, :].to(tl.int64) * s_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_positions(part, tile, tiles_per_program, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Positions (int64) of a program's tile, the tile's mask and its number of valid elements."""
    first = (part * tiles_per_program + tile) * BLOCK_P
    positions = first.to(tl.int64) + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    mask = (positions < P)[:, None] & (cols < C)[None, :]
    return positions, cols, mask, (tl.maximum(tl.minimum(P - first, BLOCK_P), 0) * C).to(tl.float32)


@triton.jit
def _sample_stats(part_ptr, sample, num_parts, eps, BLOCK_PARTS: tl.constexpr):
    """Mean and ``1 / std`` of a sample from its programs' (count, mean, squared deviations), merged in a
    fixed order (Chan et al.'s parallel variance)."""
    parts = tl.arange(0, BLOCK_PARTS)
    row = part_ptr + (sample * num_parts + parts) * 3
    valid = parts < num_parts
    count = tl.load(row, mask=valid, other=0.0)
    mean_part = tl.load(row + 1, mask=valid, other=0.0)
    total = tl.sum(count, axis=0)
    mean = tl.sum(count * mean_part, axis=0) / total
    spread = mean_part - mean
    squares = tl.sum(tl.load(row + 2, mask=valid, other=0.0) + count * spread * spread, axis=0)
    return mean, tl.rsqrt(squares / total + eps)


@triton.jit
def _group_stats_kernel(x_ptr, part_ptr, P, C, P2, s_b, s_c, s_1, s_2, tiles_per_program,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Count, mean and sum of squared deviations of this program's tiles of one sample."""
    sample, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    count, mean, squares = 0.0, 0.0, 0.0
    for tile in range(0, tiles_per_program):
        positions, cols, mask, n = _tile_positions(part, tile, tiles_per_program, P, C, BLOCK_P, BLOCK_C)
        x = _sample_tile(x_ptr, sample, positions, cols, mask, P2, s_b, s_c, s_1, s_2)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(n, 1.0)
        deviation = tl.where(mask, x - tile_mean, 0.0)
        total = count + n
        step = tile_mean - mean
        weight = n / tl.maximum(total, 1.0)
        squares += tl.sum(tl.sum(deviation * deviation, axis=1), axis=0) + step * step * count * weight
        mean += step * weight
        count = total
    row = part_ptr + (sample * tl.num_programs(1) + part) * 3
    tl.store(row, count)
    tl.store(row + 1, mean)
    tl.store(row + 2, squares)


@triton.jit
def _group_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, part_ptr, stats_ptr, P, C, P2, eps,
                           sx_b, sx_c, sx_1, sx_2, sr_b, sr_c, sr_1, sr_2, sy_b, sy_c, sy_1, sy_2, tiles_per_program,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                           AFFINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_STATS: tl.constexpr):
    """``y = (x - mean) / std * w + b (+ residual)`` over this program's tiles."""
    sample, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    mean, rstd = _sample_stats(part_ptr, sample, tl.num_programs(1), eps, BLOCK_PARTS)
    if STORE_STATS:
        if part == 0:
            tl.store(stats_ptr + sample * 2, mean)
            tl.store(stats_ptr + sample * 2 + 1, rstd)
    cols = tl.arange(0, BLOCK_C)
    scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    shift = tl.zeros([BLOCK_C], tl.float32)
    if AFFINE:
        scale *= tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        shift = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    for tile in range(0, tiles_per_program):
        positions, cols, mask, _ = _tile_positions(part, tile, tiles_per_program, P, C, BLOCK_P, BLOCK_C)
        # Centred first: no digits lost when the mean is large against the spread.
        x = _sample_tile(x_ptr, sample, positions, cols, mask, P2, sx_b, sx_c, sx_1, sx_2)
        y = (x - mean) * scale[None, :] + shift[None, :]
        if HAS_RESIDUAL:
            y += _sample_tile(r_ptr, sample, positions, cols, mask, P2, sr_b, sr_c, sr_1, sr_2)
        offsets = sample * sy_b + (positions // P2) * sy_1 + (positions % P2) * sy_2
        tl.store(y_ptr + offsets[:, None] + cols[None, :].to(tl.int64) * sy_c, y.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _group_norm_bwd_sums_kernel(x_ptr, w_ptr, dy_ptr, stats_ptr, part_ptr, dwdb_part_ptr, P, C, P2,
                                sx_b, sx_c, sx_1, sx_2, sd_b, sd_c, sd_1, sd_2, tiles_per_program,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, AFFINE: tl.constexpr):
    """This program's share of ``sum(g)`` and ``sum(g x_hat)`` (``g = dy w``) and, with ``AFFINE``, its
    partial rows of ``dw = sum(dy x_hat)`` and ``db = sum(dy)`` over positions."""
    sample, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    mean, rstd = tl.load(stats_ptr + sample * 2), tl.load(stats_ptr + sample * 2 + 1)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32) if AFFINE else 1.0
    sum_g, sum_g_x_hat = 0.0, 0.0
    dw = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for tile in range(0, tiles_per_program):
        positions, cols, mask, _ = _tile_positions(part, tile, tiles_per_program, P, C, BLOCK_P, BLOCK_C)
        x = _sample_tile(x_ptr, sample, positions, cols, mask, P2, sx_b, sx_c, sx_1, sx_2)
        dy = _sample_tile(dy_ptr, sample, positions, cols, mask, P2, sd_b, sd_c, sd_1, sd_2)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        sum_g += tl.sum(tl.sum(g, axis=1), axis=0)
        sum_g_x_hat += tl.sum(tl.sum(g * x_hat, axis=1), axis=0)
        if AFFINE:
            dw += dy * x_hat
            db += dy
    program = sample * tl.num_programs(1) + part
    tl.store(part_ptr + program * 2, sum_g)
    tl.store(part_ptr + program * 2 + 1, sum_g_x_hat)
    if AFFINE:
        cols = tl.arange(0, BLOCK_C)
        tl.store(dwdb_part_ptr + program * 2 * C + cols, tl.sum(dw, axis=0), mask=cols < C)
        tl.store(dwdb_part_ptr + (program * 2 + 1) * C + cols, tl.sum(db, axis=0), mask=cols < C)


@triton.jit
def _group_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, stats_ptr, part_ptr, dx_ptr, P, C, P2, inv_elements,
                           sx_b, sx_c, sx_1, sx_2, sd_b, sd_c, sd_1, sd_2, sdx_b, sdx_c, sdx_1, sdx_2,
                           tiles_per_program,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                           AFFINE: tl.constexpr):
    """``dx = rstd (g - mean(g) - x_hat mean(g x_hat))`` over this program's tiles; the means merge every
    program's sums in a fixed order."""
    sample, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    mean, rstd = tl.load(stats_ptr + sample * 2), tl.load(stats_ptr + sample * 2 + 1)
    parts = tl.arange(0, BLOCK_PARTS)
    row = part_ptr + (sample * tl.num_programs(1) + parts) * 2
    valid = parts < tl.num_programs(1)
    mean_g = tl.sum(tl.load(row, mask=valid, other=0.0), axis=0) * inv_elements
    mean_g_x_hat = tl.sum(tl.load(row + 1, mask=valid, other=0.0), axis=0) * inv_elements
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32) if AFFINE else 1.0
    for tile in range(0, tiles_per_program):
        positions, cols, mask, _ = _tile_positions(part, tile, tiles_per_program, P, C, BLOCK_P, BLOCK_C)
        x_hat = (_sample_tile(x_ptr, sample, positions, cols, mask, P2, sx_b, sx_c, sx_1, sx_2) - mean) * rstd
        g = _sample_tile(dy_ptr, sample, positions, cols, mask, P2, sd_b, sd_c, sd_1, sd_2) * w
        dx = (g - mean_g - x_hat * mean_g_x_hat) * rstd
        offsets = sample * sdx_b + (positions // P2) * sdx_1 + (positions % P2) * sdx_2
        tl.store(dx_ptr + offsets[:, None] + cols[None, :].to(tl.int64) * sdx_c, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)


# Most programs per sample: the partials each program of the second kernels merges.
_MAX_PARTS = 1024


def _sample_strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """Strides of batch, channel and the two position dims of a [B, C, L] or [B, C, P1, P2] tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), 0, t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _target_programs(device_index: int) -> int:
    """Programs per launch that keep every SM busy (4 per SM)."""
    return 4 if interpreting() else 4 * sm_count(device_index)


def _group_launch(x: torch.Tensor) -> Tuple[int, int, int, int, int, int, int]:
    """(positions P, P2, programs per sample, tiles per program, positions per tile, padded channels,
    warps) of a launch over ``x``."""
    batch, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    block_p, block_c, num_warps = _tile(channels)
    tiles = cdiv(positions, block_p)
    parts = max(1, min(tiles, _MAX_PARTS, cdiv(_target_programs(x.device.index or 0), batch)))
    tiles_per_program = cdiv(tiles, parts)
    return positions, x.shape[-1], cdiv(tiles, tiles_per_program), tiles_per_program, block_p, block_c, num_warps


def _group_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], eps: float, store_stats: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y in the residual's layout, else ``x``'s; the mean and ``1 / std`` per sample, [B, 2] fp32)."""
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty_like(x if residual is None else residual, dtype=out_dtype)
    batch = x.shape[0]
    P, P2, parts, tiles_per_program, block_p, block_c, num_warps = _group_launch(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    part = torch.empty(batch, parts, 3, **f32)
    stats = torch.empty(batch if store_stats else 0, 2, **f32)
    grid = (batch, parts)
    tiles = dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    _group_stats_kernel[grid](x, part, P, x.shape[1], P2, *_sample_strides(x), tiles_per_program, **tiles)
    _group_norm_fwd_kernel[grid](
        x, x if weight is None else weight, x if bias is None else bias, x if residual is None else residual, y,
        part, stats, P, x.shape[1], P2, eps, *_sample_strides(x), *_sample_strides(x if residual is None else residual),
        *_sample_strides(y), tiles_per_program, BLOCK_PARTS=next_power_of_2(parts), AFFINE=weight is not None,
        HAS_RESIDUAL=residual is not None, STORE_STATS=store_stats, **tiles,
    )
    return y, stats


def _group_backward(x: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor, dy: torch.Tensor
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx in ``x``'s dtype and, if dense, layout; dw and db in fp32 or None without affine parameters)."""
    batch, channels = x.shape[:2]
    dx = torch.empty_like(x)
    P, P2, parts, tiles_per_program, block_p, block_c, num_warps = _group_launch(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    part = torch.empty(batch, parts, 2, **f32)
    dwdb_part = torch.empty(batch * parts if weight is not None else 0, 2, channels, **f32)
    grid = (batch, parts)
    common = dict(BLOCK_P=block_p, BLOCK_C=block_c, AFFINE=weight is not None, num_warps=num_warps)
    w = x if weight is None else weight
    _group_norm_bwd_sums_kernel[grid](x, w, dy, stats, part, dwdb_part, P, channels, P2, *_sample_strides(x),
                                      *_sample_strides(dy), tiles_per_program, **common)
    _group_norm_bwd_kernel[grid](x, w, dy, stats, part, dx, P, channels, P2, 1.0 / (P * channels), *_sample_strides(x),
                                 *_sample_strides(dy), *_sample_strides(dx), tiles_per_program,
                                 BLOCK_PARTS=next_power_of_2(parts), **common)
    if weight is None:
        return dx, None, None
    dw, db = dwdb_part.sum(0)  # a fixed-order sum of one partial row per program
    return dx, dw, db


class _TritonSingleGroupNorm(torch.autograd.Function):
    """Autograd wrapper: keeps ``x`` itself (no fp32 copy), the weight and the [B, 2] statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        y, stats = _group_forward(x, weight, bias, residual, eps, store_stats=True)
        ctx.save_for_backward(x, weight, stats)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dresidual = dy.to(ctx.residual_dtype) if needs[3] else None
        if not any(needs[:3]):
            return None, None, None, dresidual, None
        dx, dw, db = _group_backward(x, weight, stats, dy)
        return (dx if needs[0] else None, dw.to(ctx.weight_dtype) if needs[1] else None,
                db.to(ctx.bias_dtype) if needs[2] else None, dresidual, None)


def single_group_norm_triton(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             eps: float, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton implementation of :func:`speechbrain_mamba.ops.norm.single_group_norm` (shapes checked there).

    Arguments
    ---------
    x : torch.Tensor
        ``[B, C, L]`` or ``[B, C, P1, P2]``, any strides (read in place; fastest with channels innermost),
        ``C <= MAX_FEATURES``.
    weight, bias : torch.Tensor, optional
        ``(C,)`` each, or both None.
    eps : float
        Added to the variance.
    residual : torch.Tensor, optional
        Same shape as ``x``, added to the normalised output in fp32.

    Returns
    -------
    torch.Tensor
        ``x``'s shape in the residual's layout (else ``x``'s), dtype ``x``'s promoted with the residual's.

    Example
    -------
    >>> x = torch.randn(1, 256, 250, 34, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> single_group_norm_triton(x, None, None, 1e-8).dtype  # doctest: +SKIP
    torch.bfloat16
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"the Triton single-group norm takes [B, C, L] or [B, C, P1, P2]; x is {tuple(x.shape)}.")
    _check(x, weight, bias, features_dim=1)
    if (weight is None) != (bias is None):
        raise ValueError("the Triton single-group norm takes both weight and bias, or neither.")
    if residual is not None and residual.device != x.device:
        raise ValueError(f"the residual is on {residual.device} but x is on {x.device}.")
    if not x.numel():  # still connected to autograd, in the residual's layout
        return x * 0.0 if residual is None else residual + x * 0.0
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not needs_autograd(x, weight, bias, residual):
        return _group_forward(x, weight, bias, residual, float(eps), store_stats=False)[0]
    return _TritonSingleGroupNorm.apply(x, weight, bias, residual, float(eps))


__all__ = ["MAX_FEATURES", "layer_norm_triton", "rms_norm_triton", "single_group_norm_triton"]
