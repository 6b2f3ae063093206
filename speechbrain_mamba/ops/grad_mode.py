"""When the ops may skip autograd's bookkeeping."""

from typing import Optional

import torch
from torch.autograd import forward_ad


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a result computed from ``tensors`` must go through autograd.

    Without it, the ops call their kernels directly: on short inputs the host's
    time per call is what bounds a model, and an autograd Function costs it more
    than the kernel launch. Inside a forward-mode AD level the Function is kept,
    so that dual tensors get its error (no ``jvp``) instead of a dropped tangent.

    Arguments
    ---------
    *tensors : torch.Tensor or None
        The op's inputs (None entries are skipped).

    Returns
    -------
    bool
        True when gradients are enabled and one of ``tensors`` requires one, or
        when a forward-mode AD level is active.

    Example
    -------
    >>> x = torch.ones(2, requires_grad=True)
    >>> needs_autograd(x, None), needs_autograd(x.detach())
    (True, False)
    >>> with torch.no_grad():
    ...     needs_autograd(x)
    False
    """
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
