"""The Mamba blocks' norms over the last dimension, RMSNorm and LayerNorm, with a Triton and a PyTorch backend."""

import functools
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

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


def _check_parameters(x: torch.Tensor, **parameters: Optional[torch.Tensor]) -> None:
    """Raises a ValueError naming the first parameter that is not ``(N,)`` for ``x`` of ``(..., N)``."""
    for name, parameter in parameters.items():
        if parameter is not None and parameter.shape != (x.shape[-1],):
            raise ValueError(
                f"{name} must be ({x.shape[-1]},) for x of shape {tuple(x.shape)}; got {tuple(parameter.shape)}."
            )


def _backend(x: torch.Tensor, backend: Optional[str]) -> Optional[ModuleType]:
    """The Triton norms' module if the norm of ``x`` runs on them, else None (PyTorch)."""
    name = backend or "auto"
    if name not in NORM_BACKENDS:
        raise ValueError(f"backend={backend!r} is not a norm backend; expected None or one of {NORM_BACKENDS}.")
    on_triton_device = x.is_cuda or interpreting()
    if name == "auto":
        # The kernels compute in fp32: float64 stays on PyTorch, which keeps its precision.
        fits = 1 <= x.shape[-1] <= TRITON_MAX_FEATURES and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
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


__all__ = ["NORM_BACKENDS", "layer_norm", "load_triton_norms", "rms_norm"]
