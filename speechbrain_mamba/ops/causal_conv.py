"""Causal depthwise convolution + SiLU of the Mamba mixer, channel-last, with a Triton and a PyTorch backend."""

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from speechbrain_mamba.ops.grad_mode import needs_autograd
from speechbrain_mamba.ops.triton_support import interpreting

CONV_BACKENDS = ("auto", "torch", "triton")
# Larger kernels run on the PyTorch backend (the Triton kernels unroll K^2 tile loads);
# causal_conv_triton.MAX_KERNEL_SIZE, repeated here so that "auto" needs no Triton import to decide.
TRITON_MAX_KERNEL_SIZE = 8


@functools.lru_cache(maxsize=None)
def load_triton_conv() -> Optional[Callable]:
    """Returns the Triton convolution, or None when Triton cannot be imported.

    Triton is imported on the first call only, so that importing this module
    (or convolving on the CPU) never loads it.
    """
    try:
        from speechbrain_mamba.ops.causal_conv_triton import causal_conv1d_silu_triton
    except ImportError:
        return None
    return causal_conv1d_silu_triton


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
    """Returns the kernel size."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, length, channels); got shape {tuple(x.shape)}.")
    batch, length, channels = x.shape
    if length == 0:
        raise ValueError("x has length 0; the convolution needs at least one frame.")
    depthwise = weight.shape[:-1] in ((channels, 1), (channels,))
    if weight.dim() not in (2, 3) or not depthwise or weight.shape[-1] < 1:
        raise ValueError(
            f"weight must be ({channels}, 1, K) or ({channels}, K) with K >= 1 for x with {channels} channels; "
            f"got {tuple(weight.shape)}."
        )
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be ({channels},) or None; got {tuple(bias.shape)}.")
    return weight.shape[-1]


def _resolve_backend(x: torch.Tensor, backend: Optional[str], kernel_size: int) -> str:
    """``"torch"`` or ``"triton"``: the backend a convolution of ``x`` runs on."""
    name = backend or "auto"
    if name not in CONV_BACKENDS:
        raise ValueError(f"backend={backend!r} is not a convolution backend; expected None or one of {CONV_BACKENDS}.")
    if name == "auto":
        use_triton = (
            (x.is_cuda or interpreting()) and kernel_size <= TRITON_MAX_KERNEL_SIZE and load_triton_conv() is not None
        )
        return "triton" if use_triton else "torch"
    if name == "triton" and not x.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors only (or under TRITON_INTERPRET=1); x is on {x.device}."
        )
    return name


def _shifts(length: int, kernel_size: int, skip_last: bool = False):
    """``(k, shift)`` per tap: tap ``k`` reads frame ``t - shift`` for output frame ``t`` (``t + shift`` when
    ``reverse``), ``shift = K - 1 - k``; taps shifted past the whole sequence are left out, and the last tap
    (shift 0) with ``skip_last``."""
    for k in range(kernel_size - 1 if skip_last else kernel_size):
        shift = kernel_size - 1 - k
        if shift < length:
            yield k, shift


def _pre_activation(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    """``bias + sum_k taps[:, k] * x`` shifted (see :func:`causal_conv1d_silu`), a new contiguous tensor in
    ``taps``' dtype. The last tap reads the frame itself: it fills the buffer, the others add to parts of it."""
    length = x.shape[1]
    out = torch.mul(x, taps[:, -1]).to(taps.dtype)
    if bias is not None:
        out.add_(bias)
    for k, shift in _shifts(length, taps.shape[1], skip_last=True):
        if reverse:
            out[:, : length - shift].addcmul_(x[:, shift:], taps[:, k])
        else:
            out[:, shift:].addcmul_(x[:, : length - shift], taps[:, k])
    return out


class _ChannelLastConv(torch.autograd.Function):
    """Autograd wrapper of the PyTorch backend: keeps ``x``, recomputes the pre-activation in the backward
    pass; ``dx`` and ``dw`` are the same shifted multiply-adds and sums, in the taps' dtype."""

    @staticmethod
    def forward(ctx, x, taps, bias, reverse):
        ctx.save_for_backward(x, taps, bias)
        ctx.reverse = reverse
        return F.silu(_pre_activation(x, taps, bias, reverse), inplace=True).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, taps, bias = ctx.saved_tensors
        pre = _pre_activation(x, taps, bias, ctx.reverse)
        sig = torch.sigmoid(pre)
        g = pre.mul_(1 - sig).add_(1).mul_(sig).mul_(dout)  # dout * silu'(pre)
        length = x.shape[1]
        dx = torch.mul(g, taps[:, -1]) if ctx.needs_input_grad[0] else None
        dtaps = torch.zeros_like(taps) if ctx.needs_input_grad[1] else None
        for k, shift in _shifts(length, taps.shape[1]):
            # The output frames that tap k wrote, and the input frames it read.
            written, read = (slice(None, length - shift), slice(shift, None)) if ctx.reverse else (
                slice(shift, None), slice(None, length - shift))
            if dx is not None and shift:
                dx[:, read].addcmul_(g[:, written], taps[:, k])
            if dtaps is not None:
                dtaps[:, k] = torch.einsum("ble,ble->e", g[:, written], x[:, read].to(g.dtype))
        db = g.sum((0, 1)) if bias is not None and ctx.needs_input_grad[2] else None
        return None if dx is None else dx.to(x.dtype), dtaps, db, None


def causal_conv1d_silu_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool = False
) -> torch.Tensor:
    """PyTorch backend of :func:`causal_conv1d_silu`: ``K`` shifted multiply-adds on the channel-last input.

    Computed in fp32 (float64 for float64 input) in a contiguous buffer, SiLU
    in place; returns a contiguous ``(batch, L, E)`` tensor in ``x``'s dtype.
    With autograd the same arithmetic runs through :class:`_ChannelLastConv`,
    so that recomputed activations equal the stored ones. On the CPU
    ``F.conv1d`` needed a padded channel-first copy that took half of its time,
    and its channel-first output slowed down the projections and the scan after
    it (``benchmarks/results/cpu_conv_ab_2026-11-25.md``).
    """
    channels, kernel_size = x.shape[-1], weight.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    taps = weight.reshape(channels, kernel_size).to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if needs_autograd(x, taps, bias):
        return _ChannelLastConv.apply(x, taps, bias, reverse)
    return F.silu(_pre_activation(x, taps, bias, reverse), inplace=True).to(x.dtype)


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    reverse: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise causal convolution followed by SiLU, on channel-last input, as in the Mamba mixer.

    For every frame ``t`` and channel ``e``, with ``x`` zero outside ``[0, L)``::

        out[b, t, e] = silu(bias[e] + sum_k weight[e, k] * x[b, t - (K - 1) + k, e])   # reverse=False
        out[b, t, e] = silu(bias[e] + sum_k weight[e, k] * x[b, t + (K - 1) - k, e])   # reverse=True

    The reverse direction is the same filter run on the time-reversed sequence
    (``flip(causal(flip(x)))``) without any flipped copy. The Triton backend
    computes in fp32, returns a contiguous tensor in ``x``'s dtype and gives the
    gradients of ``weight`` and ``bias`` in their own dtypes, so bf16 ``x`` with
    fp32 parameters works with or without autocast; it recomputes the
    convolution in the backward pass instead of keeping the output.

    Arguments
    ---------
    x : torch.Tensor
        Input, ``(batch, L, channels)``, any strides (a slice ``xz[..., :E]`` is read in place).
    weight : torch.Tensor
        Depthwise ``nn.Conv1d`` weight, ``(channels, 1, K)`` or ``(channels, K)``.
    bias : torch.Tensor, optional
        ``(channels,)``.
    reverse : bool
        Anti-causal: frame ``t`` sees frames ``t .. t + K - 1``.
    backend : str, optional
        ``"torch"``, ``"triton"`` or ``"auto"`` (the default): Triton for CUDA
        tensors when it imports and ``K <= 8`` (or under ``TRITON_INTERPRET=1``),
        PyTorch otherwise.

    Returns
    -------
    torch.Tensor
        ``(batch, L, channels)`` in ``x``'s dtype (contiguous from the Triton backend).

    Example
    -------
    >>> x = torch.randn(2, 50, 8)
    >>> conv = torch.nn.Conv1d(8, 8, kernel_size=4, groups=8)
    >>> out = causal_conv1d_silu(x, conv.weight, conv.bias)
    >>> out.shape
    torch.Size([2, 50, 8])
    >>> expected = F.silu(conv(F.pad(x.transpose(1, 2), (3, 0)))).transpose(1, 2)
    >>> torch.allclose(out, expected, atol=1e-6)
    True
    >>> flipped = causal_conv1d_silu(x.flip(1), conv.weight, conv.bias).flip(1)
    >>> torch.allclose(causal_conv1d_silu(x, conv.weight, conv.bias, reverse=True), flipped, atol=1e-6)
    True
    """
    kernel_size = _check_shapes(x, weight, bias)
    name = _resolve_backend(x, backend, kernel_size)
    if name == "triton":
        conv_fn = load_triton_conv()
        if conv_fn is None:
            raise RuntimeError("backend='triton' needs the triton package (it ships with torch on Linux).")
        return conv_fn(x, weight, bias, reverse)
    return causal_conv1d_silu_torch(x, weight, bias, reverse)


__all__ = ["CONV_BACKENDS", "causal_conv1d_silu", "causal_conv1d_silu_torch", "load_triton_conv"]
