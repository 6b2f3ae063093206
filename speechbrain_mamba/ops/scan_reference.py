"""Step-by-step selective scan: the oracle every other backend is tested against.

It follows the recurrence of kernels.md literally, one time step at a time, in
fp32, and lets autograd differentiate the loop. It is slow (one Python step per
frame) and keeps every step in the autograd graph; use it for tests only.
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def selective_scan_reference(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale=1.0, output_add=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loop implementation of :func:`speechbrain_mamba.ops.selective_scan`.

    Arguments are those of ``selective_scan`` with ``B`` and ``C`` already
    shaped ``(batch, groups, N, L)``. Returns ``(y, last_state)``.
    """
    out_dtype = u.dtype
    batch, channels, length = u.shape
    groups = B.shape[1]
    u, delta, A = u.float(), delta.float(), A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Every channel of a group reads that group's B and C.
    B = B.float().repeat_interleave(channels // groups, dim=1)
    C = C.float().repeat_interleave(channels // groups, dim=1)

    if initial_state is None:
        state = u.new_zeros(batch, channels, A.shape[1])
    else:
        state = initial_state.float()
    outputs = [None] * length
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        decay = torch.exp(delta[:, :, t, None] * A)
        drive = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, :, :, t]
        state = decay * state + drive
        outputs[t] = (state * C[:, :, :, t]).sum(-1)
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        z = z.float()
        y = y * z * torch.sigmoid(z)
    y = y * output_scale
    if output_add is not None:
        y = y + output_add.float()
    return y.to(out_dtype), state
