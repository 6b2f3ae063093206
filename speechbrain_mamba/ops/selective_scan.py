"""The one entry point of the selective scan, and the choice of its backend."""

import functools
import os
from typing import Callable, Optional, Tuple, Union

import torch

from speechbrain_mamba.ops.scan_mamba_ssm import load_mamba_ssm_scan, selective_scan_mamba_ssm
from speechbrain_mamba.ops.scan_reference import selective_scan_reference
from speechbrain_mamba.ops.scan_torch import selective_scan_torch

BACKEND_ENV_VAR = "SPEECHBRAIN_MAMBA_SCAN_BACKEND"


@functools.lru_cache(maxsize=None)
def load_triton_scan() -> Optional[Callable]:
    """Returns the Triton scan, or None when Triton cannot be imported.

    Triton is imported on the first CUDA scan only, so that importing this
    package (or scanning on the CPU) never loads it.
    """
    try:
        from speechbrain_mamba.ops.scan_triton import selective_scan_triton
    except ImportError:
        return None
    return selective_scan_triton


def selective_scan_triton(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale=1.0, output_add=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Our Triton kernels (:mod:`speechbrain_mamba.ops.scan_triton`), imported on first use."""
    scan_fn = load_triton_scan()
    if scan_fn is None:
        raise RuntimeError("backend='triton' needs the triton package (it ships with torch on Linux).")
    return scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale,
                   output_add)


BACKENDS = {
    "reference": selective_scan_reference,
    "torch": selective_scan_torch,
    "triton": selective_scan_triton,
    "mamba_ssm": selective_scan_mamba_ssm,
}


def resolve_backend(
    u: torch.Tensor, backend: Optional[str] = None, initial_state: Optional[torch.Tensor] = None
) -> str:
    """Names the backend a scan of ``u`` runs on.

    ``backend`` wins, then the environment variable
    ``SPEECHBRAIN_MAMBA_SCAN_BACKEND``, then ``"auto"``: for CUDA tensors our
    Triton kernels when Triton imports, else mamba-ssm's kernel when it imports
    (and no initial state is given); the PyTorch implementation otherwise.
    Triton comes first because our mixers run faster and leaner on it: on an
    H100, DPMamba-M took 0.33-0.81x the time and 0.5-0.6x the memory in
    inference and 0.39-0.91x / 0.6x in training that it took on mamba-ssm's
    kernel (benchmarks/results/mamba_ssm_2026-11-25_h100/).
    """
    name = backend or os.environ.get(BACKEND_ENV_VAR) or "auto"
    if name == "auto":
        if u.is_cuda and load_triton_scan() is not None:
            return "triton"
        if u.is_cuda and initial_state is None and load_mamba_ssm_scan() is not None:
            return "mamba_ssm"
        return "torch"
    if name not in BACKENDS:
        source = "backend" if backend else BACKEND_ENV_VAR
        raise ValueError(
            f"{source}={name!r} is not a selective-scan backend; "
            f"expected 'auto' or one of {sorted(BACKENDS)}."
        )
    return name


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, output_add):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length); got shape {tuple(u.shape)}.")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError("u has length 0; the scan needs at least one time step.")
    expected = {"delta": delta, "z": z, "output_add": output_add}
    for name, tensor in expected.items():
        if tensor is not None and tensor.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}; got {tuple(tensor.shape)}.")
    if A.dim() != 2 or A.shape[0] != channels or A.is_complex():
        raise ValueError(f"A must be real (channels={channels}, N); got {tuple(A.shape)} {A.dtype}.")
    state_size = A.shape[1]
    for name, tensor in (("B", B), ("C", C)):
        if (
            tensor.dim() != 4
            or tensor.shape[0] != batch
            or tensor.shape[2:] != (state_size, length)
            or tensor.shape[1] < 1
            or channels % tensor.shape[1]
        ):
            raise ValueError(
                f"{name} must be (batch={batch}, N={state_size}, L={length}) or "
                f"(batch, groups dividing {channels}, N, L); got {tuple(tensor.shape)}."
            )
    # Every backend reads B's and C's group g for the same channels.
    if B.shape[1] != C.shape[1]:
        raise ValueError(
            f"B and C must have the same number of groups; got B {tuple(B.shape)} and C {tuple(C.shape)}."
        )
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None and tensor.shape != (channels,):
            raise ValueError(f"{name} must be ({channels},); got {tuple(tensor.shape)}.")
    if initial_state is not None and initial_state.shape != (batch, channels, state_size):
        raise ValueError(
            f"initial_state must be ({batch}, {channels}, {state_size}); "
            f"got {tuple(initial_state.shape)}."
        )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[torch.Tensor] = None,
    reverse: bool = False,
    output_scale: float = 1.0,
    output_add: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Selective scan of Mamba, with the semantics of mamba-ssm's ``selective_scan_fn``.

    With ``dt = softplus(delta + delta_bias)`` (softplus only if
    ``delta_softplus``), for every channel ``e`` and state ``n``::

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
        y_t = sum_n C_t * h_t + D * u_t,    then y *= silu(z)
        y = output_scale * y + output_add

    Accumulation is fp32 whatever the input dtype; ``y`` has ``u``'s dtype.

    Arguments
    ---------
    u : torch.Tensor
        Input, ``(batch, channels, L)``.
    delta : torch.Tensor
        Step sizes before bias and softplus, ``(batch, channels, L)``.
    A : torch.Tensor
        State matrix (diagonal, negative), ``(channels, N)``, real.
    B, C : torch.Tensor
        Input and output projections, ``(batch, N, L)`` or ``(batch, groups, N, L)``, with the same
        ``groups`` (at least 1, dividing ``channels``) in both.
    D : torch.Tensor, optional
        Skip connection, ``(channels,)``.
    z : torch.Tensor, optional
        Gate, ``(batch, channels, L)``.
    delta_bias : torch.Tensor, optional
        Added to ``delta``, ``(channels,)``.
    delta_softplus : bool
        Apply softplus to ``delta + delta_bias``.
    return_last_state : bool
        Also return the final state ``(batch, channels, N)`` in fp32.
    initial_state : torch.Tensor, optional
        State before the first step, ``(batch, channels, N)`` (for streaming).
    reverse : bool
        Scan from the last frame to the first (the backward direction of a
        bidirectional model), without flipping any tensor.
    output_scale : float
        Multiplies the output (after the gate).
    output_add : torch.Tensor, optional
        Added to the scaled output, ``(batch, channels, L)``: with
        ``output_scale=0.5`` on both directions and the first direction's
        output added to the second's, the average of a bidirectional layer
        comes out of the scan (in the Triton kernel's last step).
    backend : str, optional
        ``"auto"``, ``"torch"``, ``"triton"``, ``"reference"`` or ``"mamba_ssm"``; defaults to
        the ``SPEECHBRAIN_MAMBA_SCAN_BACKEND`` environment variable, then auto.

    Returns
    -------
    y, or (y, last_state) with ``return_last_state``.

    Example
    -------
    >>> u = torch.randn(2, 8, 50)
    >>> delta = torch.rand(2, 8, 50)
    >>> A = -torch.rand(8, 4)
    >>> B, C = torch.randn(2, 4, 50), torch.randn(2, 4, 50)
    >>> y, state = selective_scan(u, delta, A, B, C, return_last_state=True)
    >>> y.shape, state.shape
    (torch.Size([2, 8, 50]), torch.Size([2, 8, 4]))
    """
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, output_add)
    name = resolve_backend(u, backend, initial_state)
    y, last_state = BACKENDS[name](
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale, output_add
    )
    return (y, last_state) if return_last_state else y
