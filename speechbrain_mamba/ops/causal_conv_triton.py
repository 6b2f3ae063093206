"""Causal depthwise convolution + SiLU as Triton kernels, channel-last, forward and backward.

Layout of the work: one program owns a ``(BLOCK_L, BLOCK_E)`` tile of one
sequence, frames by channels. Channels are contiguous in memory (the mixer's
``xz[..., :E]`` slice), so every tile load is coalesced along its rows. Tap
``k`` of the filter reads frame ``t + d_k`` with ``d_k = k - (K - 1)``
(causal) or ``(K - 1) - k`` (``reverse``, anti-causal): the forward kernel
loads the ``K`` shifted tiles of ``x``, accumulates in fp32, applies SiLU and
stores a contiguous ``(batch, L, E)`` output. No flipped copy is ever made.

Backward: with ``pre`` the convolution before SiLU and
``g = grad_out * silu'(pre)``, frame ``s`` of ``x`` feeds frame ``s + j``
(causal) or ``s - j`` (reverse) through tap ``K - 1 - j``, so
``dx[s] = sum_j w[K - 1 - j] g[s +- j]``. The backward kernel recomputes
``pre`` (and so ``g``) at the ``K`` shifted positions of its tile instead of
saving the output or writing ``g`` to memory: ``K^2`` tile loads of ``x``, all
but the first few served by the cache. Each backward program takes several
consecutive time tiles (enough programs to fill the GPU) and sums the weight
and bias gradients of their frames in registers into one fp32 row
``[dw (E x K), db (E)]``; torch sums the rows afterwards: no atomics, so the
gradients are the same bits from run to run.
"""

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from speechbrain_mamba.ops.grad_mode import needs_autograd
from speechbrain_mamba.ops.triton_support import (
    cdiv, check_32bit_offsets, interpreting, next_power_of_2, sm_count,
)

MAX_KERNEL_SIZE = 8  # the kernels unroll K (forward) and K^2 (backward) tile loads


@dataclass(frozen=True)
class ConvConfig:
    """Tile sizes and launch shape of the Triton convolution.

    Arguments
    ---------
    block_l : int
        Frames per program (a power of two; lowered for short sequences).
    block_e : int
        Channels per program (a power of two; lowered for few channels).
    num_warps : int
        Warps per program.
    """

    block_l: int = 32
    block_e: int = 128
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_l", "block_e", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ConvConfig.{name} must be a power of two; got {value}.")


# From a one-off tile sweep during development (H100, x a strided half of xz, K = 4; its script was not kept,
# so the times are indicative; benchmarks/profile_model.py gives the model-level ones). Forward: at HBM
# bandwidth with most tiles of 64-256 channels (DPMamba's (481, 250, 512): 176 us fp32, 106 us bf16;
# SepMamba's (1, 16000, 256): 18 us).
# Backward (g recomputed at K shifts: K^2 + K tile loads per tile) likes small tiles on one warp:
# benchmarks/sweep_conv_backward.py (H100, benchmarks/results/conv_backward_tiles_2026-11-25_h100.md)
# puts 16 frames x 32 channels 11-37 % below the former 32 x 64 on 2 warps on DPMamba-M's shapes (bf16
# and fp32), within +-10 % on SepMamba-M's stages but the first in fp32 (+21 %, 21 us); loading each of
# the 2K - 1 shifted tiles once instead of K^2 times was not faster in bf16 (same sweep). It is still
# 5-6x the forward.
FORWARD_CONFIG = ConvConfig(block_l=32, block_e=128, num_warps=4)
BACKWARD_CONFIG = ConvConfig(block_l=16, block_e=32, num_warps=1)


@triton.jit
def _tap_shift(k, K: tl.constexpr, REVERSE: tl.constexpr):
    """Offset ``d_k`` of the frame that tap ``k`` reads, relative to the output frame."""
    if REVERSE:
        return (K - 1) - k
    else:
        return k - (K - 1)


@triton.jit
def _conv_tile(x_seq, w_ptr, bias, t, offs_e, mask_e, L, sx_l,
               K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, REVERSE: tl.constexpr):
    """Pre-activation ``bias + sum_k w_k x[t + d_k]`` of frames ``t``, a ``(BLOCK_L, BLOCK_E)`` fp32 tile."""
    acc = tl.zeros([BLOCK_L, BLOCK_E], tl.float32) + bias[None, :]
    for k in tl.static_range(K):
        w_k = tl.load(w_ptr + offs_e * K + k, mask=mask_e, other=0.0).to(tl.float32)
        src = t + _tap_shift(k, K, REVERSE)
        mask = ((src >= 0) & (src < L))[:, None] & mask_e[None, :]  # zero padding outside [0, L)
        x_k = tl.load(x_seq + src[:, None] * sx_l, mask=mask, other=0.0).to(tl.float32)
        acc += w_k[None, :] * x_k
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    L, E, num_lblocks, sx_b, sx_l, sx_e,
    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
):
    """``out = silu(conv(x))`` on one ``(BLOCK_L, BLOCK_E)`` tile; ``out`` is contiguous."""
    pid = tl.program_id(0)
    pid_b = pid // num_lblocks
    pid_l = pid % num_lblocks
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E

    bias = tl.zeros([BLOCK_E], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    x_seq = x_ptr + pid_b * sx_b + offs_e[None, :] * sx_e
    pre = _conv_tile(x_seq, w_ptr, bias, offs_t, offs_e, mask_e, L, sx_l, K, BLOCK_L, BLOCK_E, REVERSE)
    out = pre * tl.sigmoid(pre)
    mask = (offs_t < L)[:, None] & mask_e[None, :]
    tl.store(out_ptr + (pid_b * L + offs_t)[:, None] * E + offs_e[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, part_ptr,
    L, E, num_lblocks, num_tiles, tiles_per_program, sx_b, sx_l, sx_e, sg_b, sg_l, sg_e,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, WANT_DX: tl.constexpr, WANT_DW: tl.constexpr,
    SHIFTS: tl.constexpr,
):
    """``dx`` of ``tiles_per_program`` consecutive tiles of frames ``s`` (contiguous), and their share of
    ``dw`` and ``db``, summed in registers and stored as this program's partial row ``[dw (E x K), db (E)]``.

    ``g`` is recomputed at frames ``s + j`` (causal) or ``s - j`` (reverse) for
    ``j < K``: those are the frames that frame ``s`` feeds, through tap ``K - 1 - j``.
    ``SHIFTS``: ``K``, or 1 when only ``dw`` and ``db`` are wanted (they need ``g`` at ``s`` only).
    """
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    taps = tl.arange(0, BLOCK_K)

    bias = tl.zeros([BLOCK_E], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_K, BLOCK_E], tl.float32)
    db = tl.zeros([BLOCK_E], tl.float32)
    for i in range(0, tiles_per_program):
        tile = tl.program_id(0) * tiles_per_program + i
        pid_b = tile // num_lblocks
        offs_s = (tile % num_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        length = tl.where(tile < num_tiles, L, 0)  # past the last tile every frame is masked
        x_seq = x_ptr + pid_b * sx_b + offs_e[None, :] * sx_e
        g_seq = dout_ptr + pid_b * sg_b + offs_e[None, :] * sg_e
        dx = tl.zeros([BLOCK_L, BLOCK_E], tl.float32)
        for j in tl.static_range(SHIFTS):
            if REVERSE:
                t = offs_s - j
            else:
                t = offs_s + j
            pre = _conv_tile(x_seq, w_ptr, bias, t, offs_e, mask_e, length, sx_l, K, BLOCK_L, BLOCK_E, REVERSE)
            # Frames outside [0, L) have no output: their grad_out (and so g) is 0.
            mask_t = ((t >= 0) & (t < length))[:, None] & mask_e[None, :]
            dout = tl.load(g_seq + t[:, None] * sg_l, mask=mask_t, other=0.0).to(tl.float32)
            sig = tl.sigmoid(pre)
            g = dout * sig * (1.0 + pre * (1.0 - sig))
            if WANT_DX:
                w_tap = tl.load(w_ptr + offs_e * K + (K - 1 - j), mask=mask_e, other=0.0).to(tl.float32)
                dx += w_tap[None, :] * g
            if WANT_DW:
                if j == 0:
                    # This tile's own frames: dw_k = sum_t g[t] x[t + d_k], db = sum_t g[t].
                    for k in tl.static_range(K):
                        src = offs_s + _tap_shift(k, K, REVERSE)
                        mask_k = ((src >= 0) & (src < length))[:, None] & mask_e[None, :]
                        x_k = tl.load(x_seq + src[:, None] * sx_l, mask=mask_k, other=0.0).to(tl.float32)
                        dw += tl.where(taps[:, None] == k, tl.sum(g * x_k, axis=0)[None, :], 0.0)
                    if HAS_BIAS:
                        db += tl.sum(g, axis=0)
        if WANT_DX:
            mask = (offs_s < length)[:, None] & mask_e[None, :]
            tl.store(dx_ptr + (pid_b * L + offs_s)[:, None] * E + offs_e[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WANT_DW:
        row = part_ptr + tl.program_id(0) * (E * (K + 1))
        tl.store(row + offs_e[None, :] * K + taps[:, None], dw, mask=(taps < K)[:, None] & mask_e[None, :])
        if HAS_BIAS:
            tl.store(row + E * K + offs_e, db, mask=mask_e)


@dataclass(frozen=True)
class _Launch:
    block_l: int
    block_e: int
    num_warps: int
    num_lblocks: int
    num_eblocks: int


@functools.lru_cache(maxsize=4096)
def _plan(batch: int, length: int, channels: int, config: ConvConfig) -> _Launch:
    # Short sequences or few channels: smaller tiles, but not below 16 (masked lanes are cheap, tiny tiles not).
    block_l = min(config.block_l, max(16, next_power_of_2(length)))
    block_e = min(config.block_e, max(16, next_power_of_2(channels)))
    return _Launch(block_l, block_e, config.num_warps, cdiv(length, block_l), cdiv(channels, block_e))


def _forward(x, weight2d, bias, reverse, config):
    batch, length, channels = x.shape
    plan = _plan(batch, length, channels, config)
    out = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device)
    check_32bit_offsets(x=x, output=out)
    if out.numel():
        grid = (batch * plan.num_lblocks, plan.num_eblocks)
        _conv_fwd_kernel[grid](
            x, weight2d, weight2d if bias is None else bias, out,
            length, channels, plan.num_lblocks, *x.stride(),
            K=weight2d.shape[1], BLOCK_L=plan.block_l, BLOCK_E=plan.block_e,
            HAS_BIAS=bias is not None, REVERSE=reverse, num_warps=plan.num_warps,
        )
    return out


def _backward_programs(device_index: int) -> int:
    """Programs of a backward launch that keep the SMs busy with one-warp programs (64 per SM); more tiles
    are looped over by each program, which sums its tiles' weight gradients in registers."""
    return 4 if interpreting() else 64 * sm_count(device_index)


def _backward(x, weight2d, bias, dout, reverse, want_dx, want_dw, config):
    batch, length, channels = x.shape
    kernel_size = weight2d.shape[1]
    plan = _plan(batch, length, channels, config)
    num_tiles = batch * plan.num_lblocks
    tiles_per_program = max(1, cdiv(num_tiles * plan.num_eblocks, _backward_programs(x.device.index or 0)))
    rows = cdiv(num_tiles, tiles_per_program)
    dx = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device) if want_dx else None
    # One partial row per program along the frames: dw (E x K), then db (E).
    part = torch.empty(rows if want_dw else 0, channels * (kernel_size + 1), dtype=torch.float32, device=x.device)
    check_32bit_offsets(grad_out=dout, weight_partials=part)  # x and dx were checked with the output
    if x.numel():
        _conv_bwd_kernel[(rows, plan.num_eblocks)](
            x, weight2d, weight2d if bias is None else bias, dout, part if dx is None else dx, part,
            length, channels, plan.num_lblocks, num_tiles, tiles_per_program, *x.stride(), *dout.stride(),
            K=kernel_size, BLOCK_K=next_power_of_2(kernel_size), BLOCK_L=plan.block_l, BLOCK_E=plan.block_e,
            HAS_BIAS=bias is not None, REVERSE=reverse, WANT_DX=want_dx, WANT_DW=want_dw,
            SHIFTS=kernel_size if want_dx else 1, num_warps=plan.num_warps,
        )
    if not want_dw:
        return dx, None, None
    # A fixed-order sum over the programs' rows: deterministic, unlike atomics.
    sums = part.sum(0)
    dw = sums[: channels * kernel_size].view(channels, kernel_size)
    return dx, dw, (sums[channels * kernel_size:] if bias is not None else None)


def _kernel_parameters(
    weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight as a contiguous (E, K) tensor and the bias contiguous, as the kernels read them."""
    return weight.reshape(weight.shape[0], -1).contiguous(), None if bias is None else bias.contiguous()


class _TritonCausalConv(torch.autograd.Function):
    """Autograd wrapper: the forward keeps only ``x``, the weight and the bias; the backward recomputes the rest.

    No torch op here is one that autocast recasts: the kernels read every input
    in its own dtype and compute in fp32, so bf16 ``x`` with fp32 parameters works
    with or without autocast.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, reverse, fwd_config, bwd_config):
        weight2d, bias_c = _kernel_parameters(weight, bias)
        out = _forward(x, weight2d, bias_c, reverse, fwd_config)
        ctx.save_for_backward(x, weight2d, bias_c)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.reverse, ctx.bwd_config = reverse, bwd_config
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight2d, bias = ctx.saved_tensors
        want_dx = ctx.needs_input_grad[0]
        want_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dw, db = _backward(x, weight2d, bias, dout, ctx.reverse, want_dx, want_dw, ctx.bwd_config)
        dw = None if dw is None or not ctx.needs_input_grad[1] else dw.reshape(ctx.weight_shape).to(ctx.weight_dtype)
        db = None if db is None or not ctx.needs_input_grad[2] else db.to(bias.dtype)
        return dx, dw, db, None, None, None


def causal_conv1d_silu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    reverse: bool = False,
    forward_config: Optional[ConvConfig] = None,
    backward_config: Optional[ConvConfig] = None,
) -> torch.Tensor:
    """Triton implementation of :func:`speechbrain_mamba.ops.causal_conv.causal_conv1d_silu`.

    Shapes are checked by ``causal_conv1d_silu``; here only what the kernels
    need (device, kernel size, 32-bit offsets).

    Arguments
    ---------
    x : torch.Tensor
        ``(batch, L, E)``, any strides (read in place).
    weight : torch.Tensor
        ``(E, 1, K)`` or ``(E, K)``, ``K <= MAX_KERNEL_SIZE``.
    bias : torch.Tensor, optional
        ``(E,)``.
    reverse : bool
        Anti-causal: the filter runs on the time-reversed sequence.
    forward_config, backward_config : ConvConfig, optional
        Tile sizes (defaults: ``FORWARD_CONFIG``, ``BACKWARD_CONFIG``).

    Returns
    -------
    torch.Tensor
        ``(batch, L, E)``, contiguous, in ``x``'s dtype.

    Example
    -------
    >>> x = torch.randn(2, 100, 2 * 64, device="cuda")[..., :64]  # doctest: +SKIP
    >>> weight, bias = torch.randn(64, 1, 4, device="cuda"), torch.zeros(64, device="cuda")  # doctest: +SKIP
    >>> causal_conv1d_silu_triton(x, weight, bias).is_contiguous()  # doctest: +SKIP
    True
    """
    if not x.is_cuda and not interpreting():
        raise ValueError(f"backend='triton' runs on CUDA tensors only (or under TRITON_INTERPRET=1); "
                         f"x is on {x.device}.")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}.")
    kernel_size = weight.shape[-1]
    if not 1 <= kernel_size <= MAX_KERNEL_SIZE:
        raise ValueError(f"backend='triton' supports kernel sizes 1 to {MAX_KERNEL_SIZE}; weight has "
                         f"{kernel_size}. Use backend='torch'.")
    forward_config = forward_config or FORWARD_CONFIG
    if not needs_autograd(x, weight, bias):
        return _forward(x, *_kernel_parameters(weight, bias), bool(reverse), forward_config)
    return _TritonCausalConv.apply(x, weight, bias, bool(reverse), forward_config, backward_config or BACKWARD_CONFIG)


__all__ = ["BACKWARD_CONFIG", "FORWARD_CONFIG", "MAX_KERNEL_SIZE", "ConvConfig", "causal_conv1d_silu_triton"]
