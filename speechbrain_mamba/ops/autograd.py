"""When the ops may skip autograd's bookkeeping."""

from typing import Optional

import torch


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a result computed from ``tensors`` must be differentiable: gradients are enabled and
    one of them (None entries skipped) requires a gradient.

    Without it, the ops call their kernels directly: on short inputs the host's time per call is
    what bounds a model, and an autograd Function costs it more than the kernel launch.

    Example
    -------
    >>> x = torch.ones(2, requires_grad=True)
    >>> needs_autograd(x, None), needs_autograd(x.detach())
    (True, False)
    >>> with torch.no_grad():
    ...     needs_autograd(x)
    False
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
