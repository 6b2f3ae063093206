"""RMSNorm over the last dimension (mamba-ssm's norm), with a Triton and a PyTorch backend."""

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from speechbrain_mamba.ops.triton_support import interpreting

NORM_BACKENDS = ("auto", "torch", "triton")
# rms_norm_triton.MAX_FEATURES, repeated here so that "auto" needs no Triton import to decide.
TRITON_MAX_FEATURES = 8192


@functools.lru_cache(maxsize=None)
def load_triton_rms_norm() -> Optional[Callable]:
    """Returns the Triton RMSNorm, or None when Triton cannot be imported (imported on first use)."""
    try:
        from speechbrain_mamba.ops.rms_norm_triton import rms_norm_triton
    except ImportError:
        return None
    return rms_norm_triton


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch backend of :func:`rms_norm`: the fused ``F.rms_norm`` in fp32, cast back to ``x``'s dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def _resolve_backend(x: torch.Tensor, backend: Optional[str]) -> str:
    name = backend or "auto"
    if name not in NORM_BACKENDS:
        raise ValueError(f"backend={backend!r} is not a norm backend; expected None or one of {NORM_BACKENDS}.")
    on_triton_device = x.is_cuda or interpreting()
    if name == "auto":
        fits = x.shape[-1] <= TRITON_MAX_FEATURES
        return "triton" if on_triton_device and fits and load_triton_rms_norm() is not None else "torch"
    if name == "triton" and not on_triton_device:
        raise ValueError(
            f"backend='triton' runs on CUDA tensors only (or under TRITON_INTERPRET=1); x is on {x.device}."
        )
    return name


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
        ``"torch"``, ``"triton"`` or ``"auto"`` (the default): Triton for CUDA
        tensors when it imports and ``N <= 8192`` (or under
        ``TRITON_INTERPRET=1``), PyTorch otherwise.

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
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},) for x of shape {tuple(x.shape)}; got {tuple(weight.shape)}.")
    if _resolve_backend(x, backend) == "triton":
        norm_fn = load_triton_rms_norm()
        if norm_fn is None:
            raise RuntimeError("backend='triton' needs the triton package (it ships with torch on Linux).")
        return norm_fn(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


__all__ = ["NORM_BACKENDS", "load_triton_rms_norm", "rms_norm", "rms_norm_torch"]
