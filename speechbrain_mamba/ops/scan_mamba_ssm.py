"""mamba-ssm's CUDA selective scan, for users who ask for it (``backend="mamba_ssm"``) or have no Triton.

Nothing here is imported until a CUDA tensor asks for it, so a CPU-only install
never touches mamba_ssm (which cannot even be imported without its compiled
``selective_scan_cuda`` extension).
"""

import functools
from typing import Callable, Optional, Tuple

import torch

from speechbrain_mamba.ops.scan_torch import scale_and_add


@functools.lru_cache(maxsize=None)
def load_mamba_ssm_scan() -> Optional[Callable]:
    """Returns mamba-ssm's ``selective_scan_fn``, or None when it cannot be imported."""
    try:
        import selective_scan_cuda  # noqa: F401  (the compiled kernel itself)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def selective_scan_mamba_ssm(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale=1.0, output_add=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Calls mamba-ssm's kernel; a reverse scan runs on time-flipped copies, the
    output's scale and addition are separate operations.

    The last state comes back detached: mamba-ssm propagates no gradient through it.
    """
    scan_fn = load_mamba_ssm_scan()
    if scan_fn is None:
        raise RuntimeError(
            "backend='mamba_ssm' needs mamba-ssm with its compiled CUDA extension "
            "(pip install 'speechbrain-mamba[mamba-ssm]'); use backend='torch' instead."
        )
    if not u.is_cuda:
        raise ValueError("backend='mamba_ssm' runs on CUDA tensors only; u is on " f"{u.device}.")
    if initial_state is not None:
        raise ValueError("backend='mamba_ssm' does not take an initial_state; use backend='torch'.")
    if reverse:
        u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
        z = None if z is None else z.flip(-1)
    y, last_state = scan_fn(
        u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias, delta_softplus,
        return_last_state=True,
    )
    # The kernel's backward ignores the returned state: detach it so that a loss on
    # it fails loudly instead of receiving a silently wrong gradient.
    y = scale_and_add(y.flip(-1) if reverse else y, output_scale, output_add)
    return y, last_state.detach()
