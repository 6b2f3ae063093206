"""Selective scan in plain PyTorch: runs on any device, differentiable, no build.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` is evaluated by a two-level chunked
scan on a time-major ``(L, M)`` layout (``M = batch * channels * N`` states):

1. the sequence is cut into ``n`` chunks of ``T = ceil(sqrt(L))`` frames, and
   the end state and total decay of every chunk are computed for all chunks at
   once in ``T`` vectorised steps;
2. the state entering each chunk is carried across chunks in ``n`` small steps;
3. all chunks are scanned at once from their entering states, in place.

Work is ``O(L * M)`` like the loop, in ``~3 * sqrt(L)`` Python steps instead of
``L``, reading the inputs about twice. Memory is ``O(L * M)``: the decays and
the states are the only full-size tensors, kept for the backward pass
(``2 * L * M`` fp32 values); scanning itself needs ``O(sqrt(L) * M)``. The backward pass is the same scan run
in the opposite direction (``LinearScan``).
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _scan_(
    coeff: torch.Tensor,
    values: torch.Tensor,
    initial: Optional[torch.Tensor],
    reverse: bool,
) -> torch.Tensor:
    """In place: ``values[t] += coeff[t] * values[t -/+ 1]`` over dim 0.

    ``coeff`` and ``values`` are contiguous ``(L, M)``; ``initial`` is the state
    before the first step (``(M,)`` or None for zeros). With ``reverse`` the
    scan runs from ``L - 1`` down to 0.
    """
    length = values.shape[0]
    chunk = math.isqrt(length - 1) + 1 if length > 1 else 1  # ceil(sqrt(L))
    num_chunks = length // chunk
    ragged = length - num_chunks * chunk
    # The whole chunks come first in scan order, the ragged rest last.
    body = slice(ragged, length) if reverse else slice(0, num_chunks * chunk)
    chunks = values[body].view(num_chunks, chunk, -1)
    chunk_coeff = coeff[body].view(num_chunks, chunk, -1)
    order = range(chunk - 1, -1, -1) if reverse else range(chunk)

    # 1) Every chunk's end state from a zero start, and its total decay, all
    #    chunks at once; the intermediate states are not stored.
    end_state = chunks[:, order[0]].clone()
    spare = torch.empty_like(end_state)  # ping-pong buffer: no allocation per step
    total_decay = chunk_coeff[:, order[0]].clone()
    for t in order[1:]:
        torch.addcmul(chunks[:, t], chunk_coeff[:, t], end_state, out=spare)
        end_state, spare = spare, end_state
        total_decay.mul_(chunk_coeff[:, t])

    # 2) The state entering each chunk, carried from chunk to chunk.
    entering = torch.zeros_like(end_state)
    carry = initial
    for k in reversed(range(num_chunks)) if reverse else range(num_chunks):
        if carry is None:
            carry = end_state[k]
            continue
        entering[k] = carry
        carry = torch.addcmul(end_state[k], total_decay[k], carry)

    # 3) Scan all chunks at once, each from its entering state.
    chunks[:, order[0]].addcmul_(chunk_coeff[:, order[0]], entering)
    for prev, t in zip(order, order[1:]):
        chunks[:, t].addcmul_(chunk_coeff[:, t], chunks[:, prev])

    tail = range(ragged - 1, -1, -1) if reverse else range(num_chunks * chunk, length)
    for t in tail:
        values[t].addcmul_(coeff[t], carry)
        carry = values[t]
    return values


class LinearScan(torch.autograd.Function):
    """``h_t = a_t * h_{t-1} + b_t`` (or ``h_{t+1}`` with reverse), in place on b.

    Inputs are fp32 contiguous tensors ``a`` and ``b`` of one shape ``(L, ...)``
    and an optional initial state of shape ``b.shape[1:]``. ``b`` must not be
    a view: autograd drops the other inputs' gradients when a view is modified. The gradient of a forward scan is a reverse scan
    whose coefficient at ``t`` is ``a_{t+1}``, and vice versa.
    """

    @staticmethod
    def forward(ctx, decay, drive, initial, reverse):
        length = drive.shape[0]
        flat_initial = None if initial is None else initial.reshape(-1)
        _scan_(decay.view(length, -1), drive.view(length, -1), flat_initial, reverse)
        states = drive
        ctx.mark_dirty(drive)
        ctx.reverse = reverse
        ctx.save_for_backward(decay, states, initial)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        decay, states, initial = ctx.saved_tensors
        reverse = ctx.reverse
        shape = decay.shape
        decay, states = decay.view(shape[0], -1), states.view(shape[0], -1)
        if initial is not None:
            initial = initial.reshape(-1)
        # In scan order: `first` has no predecessor; every `step` follows `prev`.
        first = -1 if reverse else 0
        step = slice(None, -1) if reverse else slice(1, None)
        prev = slice(1, None) if reverse else slice(None, -1)

        coeff = torch.zeros_like(decay)
        coeff[prev] = decay[step]  # how much of h_prev's gradient flows back
        grad_drive = grad_states.reshape(decay.shape).clone(memory_format=torch.contiguous_format)
        _scan_(coeff, grad_drive, None, not reverse)

        grad_decay = coeff  # buffer reused: d h_t / d a_t = h_prev
        torch.mul(grad_drive[step], states[prev], out=grad_decay[step])
        grad_initial = None
        if initial is None:
            grad_decay[first].zero_()
        else:
            torch.mul(grad_drive[first], initial, out=grad_decay[first])
            if ctx.needs_input_grad[2]:
                grad_initial = (grad_drive[first] * decay[first]).view(shape[1:])
        return grad_decay.view(shape), grad_drive.view(shape), grad_initial, None


def selective_scan_torch(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch implementation of :func:`speechbrain_mamba.ops.selective_scan`.

    Arguments are those of ``selective_scan`` with ``B`` and ``C`` shaped
    ``(batch, groups, N, L)``. Returns ``(y, last_state)``.
    """
    batch, channels, length = u.shape
    groups, state_size = B.shape[1], A.shape[1]
    per_group = channels // groups
    # Time-major [L, batch, groups, channels per group, N]: one scan step reads
    # one contiguous block, and B/C broadcast over the channels of their group.
    grouped = (length, batch, groups, per_group, 1)

    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.permute(2, 0, 1).contiguous().view(grouped)
    u_t = u.float().permute(2, 0, 1).contiguous().view(grouped)
    decay = torch.mul(dt, A.float().view(groups, per_group, state_size)).exp_()
    B_t = B.float().permute(3, 0, 1, 2).contiguous().unsqueeze(3)  # [L, batch, groups, 1, N]
    drive = (dt * u_t) * B_t

    initial = None
    if initial_state is not None:
        initial = initial_state.float().reshape(decay.shape[1:])
    states = LinearScan.apply(decay, drive, initial, reverse)

    C_t = C.float().permute(3, 0, 1, 2).unsqueeze(-1)  # [L, batch, groups, N, 1]
    y = torch.matmul(states, C_t).view(length, batch, channels).permute(1, 2, 0)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    last_state = states[0 if reverse else -1].reshape(batch, channels, state_size)
    return y.to(u.dtype), last_state
