"""The norms of the models, each with a Triton and a PyTorch backend: the Mamba blocks' RMSNorm and LayerNorm over
the last dimension, and the dual-path layers' ``GroupNorm(1, C)`` over a whole sample, fused with the residual sum."""

import functools
import math
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from speechbrain_mamba.ops.grad_mode import needs_autograd
from speechbrain_mamba.ops.triton_support import interpreting

NORM_BACKENDS = ("auto", "torch", "triton")
# norm_triton.MAX_FEATURES, repeated here so that "auto" needs no Triton import to decide.
TRITON_MAX_FEATURES = 8192


@functools.lru_cache(maxsize=None)
def load_triton_norms() -> Optional[ModuleType]:
    """Returns the module of the Triton norms, or None when Triton cannot be imported (imported on first use)."""
    try:
        from speechbrain_mamba.ops import norm_triton
    except ImportError:
        return None
    return norm_triton


def _check_parameters(x: torch.Tensor, features_dim: int = -1, **parameters: Optional[torch.Tensor]) -> None:
    """Raises a ValueError naming the first parameter that is not ``(N,)``, ``N = x.shape[features_dim]``."""
    features = x.shape[features_dim]
    for name, parameter in parameters.items():
        if parameter is not None and parameter.shape != (features,):
            raise ValueError(
                f"{name} must be ({features},) for x of shape {tuple(x.shape)}; got {tuple(parameter.shape)}."
            )


def _backend(x: torch.Tensor, backend: Optional[str], features_dim: int = -1) -> Optional[ModuleType]:
    """The Triton norms' module if the norm of ``x`` (rows of size ``x.shape[features_dim]``) runs on them,
    else None (PyTorch)."""
    name = backend or "auto"
    if name not in NORM_BACKENDS:
        raise ValueError(f"backend={backend!r} is not a norm backend; expected None or one of {NORM_BACKENDS}.")
    on_triton_device = x.is_cuda or interpreting()
    if name == "auto":
        # The kernels compute in fp32: float64 stays on PyTorch, which keeps its precision.
        fits = 1 <= x.shape[features_dim] <= TRITON_MAX_FEATURES and x.dtype in (
            torch.float32, torch.float16, torch.bfloat16)
        return load_triton_norms() if on_triton_device and fits else None
    if name == "torch":
        return None
    if not on_triton_device:
        raise ValueError(
            f"backend='triton' runs on CUDA tensors only (or under TRITON_INTERPRET=1); x is on {x.device}."
        )
    module = load_triton_norms()
    if module is None:
        raise RuntimeError("backend='triton' needs the triton package (it ships with torch on Linux).")
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend: Optional[str] = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in fp32.

    Both backends compute in fp32 and return ``x``'s dtype. The Triton one
    (CUDA) reads ``x`` in its own dtype, makes one kernel per pass instead of
    PyTorch's casts around the fused norm, and keeps ``x`` itself for the
    backward pass, not an fp32 copy.

    Arguments
    ---------
    x : torch.Tensor
        ``(..., N)``.
    weight : torch.Tensor
        ``(N,)``.
    eps : float
        Added to the mean square.
    backend : str, optional
        ``"torch"``, ``"triton"`` or ``"auto"`` (the default): Triton for
        fp32, fp16 and bf16 CUDA tensors when it imports and ``1 <= N <= 8192``
        (or under ``TRITON_INTERPRET=1``), PyTorch otherwise.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.

    Example
    -------
    >>> x = torch.randn(2, 5, 8)
    >>> y = rms_norm(x, torch.ones(8))
    >>> torch.allclose(y.pow(2).mean(-1), torch.ones(2, 5), atol=1e-4)
    True
    """
    _check_parameters(x, weight=weight)
    module = _backend(x, backend)
    if module is not None:
        return module.rms_norm_triton(x, weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension, with the same dtypes under autocast.

    PyTorch's autocast runs ``layer_norm`` in fp32 (fp32 output); without
    autocast the output has ``x``'s dtype. The Triton backend gives the same
    dtypes, reads ``x`` in its own dtype and keeps ``x`` itself for the
    backward pass.

    Arguments
    ---------
    x, weight, backend
        As for :func:`rms_norm`.
    bias : torch.Tensor, optional
        ``(N,)``.
    eps : float
        Added to the variance.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.

    Example
    -------
    >>> x = torch.randn(2, 5, 8)
    >>> y = layer_norm(x, torch.ones(8), torch.zeros(8))
    >>> torch.allclose(y, F.layer_norm(x, (8,), torch.ones(8), torch.zeros(8)), atol=1e-5)
    True
    """
    _check_parameters(x, weight=weight, bias=bias)
    module = _backend(x, backend)
    if module is not None:
        autocast = torch.is_autocast_enabled(x.device.type)
        return module.layer_norm_triton(x, weight, bias, eps, torch.float32 if autocast else x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def single_group_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``GroupNorm(1, C)``: each sample normalised over all its channels and positions, then a per-channel
    affine map; plus ``residual`` if given. Statistics in fp32.

    The output has ``x``'s dtype (promoted with the residual's). The PyTorch
    backend takes the statistics in two passes over the whole sample (its
    mean, then the norm of the centred values: ``nn.GroupNorm`` reduces a
    sample in one thread block on CUDA, slow at batch 1, and
    ``torch.var_mean`` is slow on the CPU) and reads any layout in place. The Triton one (CUDA) is two
    kernels per pass instead of about eight forward and twelve backward, adds
    the residual in fp32 before the one rounding, keeps ``x`` itself for the
    backward pass, and writes the output in the residual's layout (else in
    ``x``'s): the dual-path layers' channels-innermost activations stay so.

    Arguments
    ---------
    x : torch.Tensor
        ``[B, C, *]``.
    weight, bias : torch.Tensor, optional
        ``(C,)`` each, or both None (no affine map).
    eps : float
        Added to the variance.
    residual : torch.Tensor, optional
        Same shape as ``x``.
    backend : str, optional
        ``"torch"``, ``"triton"`` or ``"auto"`` (the default): Triton for fp32,
        fp16 and bf16 CUDA tensors of 3 or 4 dims with ``1 <= C <= 8192`` (and no
        float64 residual) when it imports (or under ``TRITON_INTERPRET=1``),
        PyTorch otherwise.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.

    Example
    -------
    >>> x = torch.randn(2, 8, 5, 3)
    >>> reference = torch.nn.GroupNorm(1, 8)
    >>> torch.allclose(single_group_norm(x, reference.weight, reference.bias), reference(x), atol=1e-5)
    True
    """
    if x.dim() < 2:
        raise ValueError(f"single_group_norm expects x of [batch, channels, ...]; got shape {tuple(x.shape)}.")
    if (weight is None) != (bias is None):
        raise ValueError("single_group_norm takes both weight and bias, or neither.")
    _check_parameters(x, 1, weight=weight, bias=bias)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}.")
    module = _backend(x, backend, features_dim=1)
    # "auto" leaves float64 residuals to PyTorch too: the kernels read in fp32.
    fits = x.dim() in (3, 4) and (residual is None or residual.dtype != torch.float64)
    if module is not None and (fits or backend == "triton"):
        return module.single_group_norm_triton(x, weight, bias, eps, residual)
    x32 = x if x.dtype == torch.float64 else x.float()  # float64 keeps its precision
    # Two passes over the sample (its mean, then the norm of the centred values), through all dims but the batch
    # (no copy of a permuted, e.g. channels-innermost, input): on the CPU 6x faster than torch.var_mean's
    # Welford reduction on DPMamba-M's dual-path activations (2 cores), and as exact.
    dims = tuple(range(1, x.dim()))
    centred = x32 - x32.mean(dims, keepdim=True)
    mean_square = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square() / max(1, math.prod(x.shape[1:]))
    scale = torch.rsqrt(mean_square + eps)  # [batch, 1, ...]
    view = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        scale = scale * weight.to(x32.dtype).view(view)
        bias = bias.to(x32.dtype).view(view)
    if needs_autograd(x, weight, bias):
        out = centred * scale if weight is None else torch.addcmul(bias, centred, scale)
    else:  # the centred copy becomes the output
        out = centred.mul_(scale) if weight is None else centred.mul_(scale).add_(bias)
    out = out.to(x.dtype)
    return out if residual is None else residual + out  # the first operand's layout: the residual's


__all__ = ["NORM_BACKENDS", "layer_norm", "load_triton_norms", "rms_norm", "single_group_norm"]
