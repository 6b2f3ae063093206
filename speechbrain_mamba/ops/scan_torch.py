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
(``2 * L * M`` fp32 values); scanning itself needs ``O(sqrt(L) * M)``. The
backward pass is the same scan run in the opposite direction
(``SelectiveScanFunction``).

Without autograd nothing is kept for a backward pass, and the scan walks time
frame by frame in blocks that stay in the CPU caches instead
(``_selective_scan_inference``): 2.4-2.7x faster on DPMamba's shapes on a
2-core CPU, with memory ``O(batch * L * channels)`` plus a few MiB.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from speechbrain_mamba.ops.grad_mode import needs_autograd


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


class SelectiveScanFunction(torch.autograd.Function):
    """The state-space part of the scan, ``(dt, u, A, B, C) -> y``, with a hand-written backward.

    Time-major fp32 inputs: ``dt`` and ``u`` ``(L, batch, groups, P)`` (``P``
    channels per group), ``A`` ``(groups, N, P)``, ``B`` and ``C``
    ``(L, batch, groups, N)``, ``initial`` ``(batch, groups, N, P)`` or None.
    Returns ``y`` ``(L, batch, groups, P)`` and the last state
    ``(batch, groups, N, P)``. States are laid out ``(..., N, P)`` so that the
    contractions over ``N`` are vector-matrix products over long rows.

    Autograd through the broadcast products would allocate about six
    full-size ``(L, batch, channels, N)`` temporaries in backward; fresh
    large tensors are slow on the CPU (page faults), so the backward here
    allocates one (the state gradients) and reuses it for the decays' gradients. The
    gradient of a forward scan is a reverse scan whose coefficient at ``t``
    is ``a_{t+1}``, and vice versa.
    """

    @staticmethod
    def forward(ctx, dt, u, A, B, C, initial, reverse):
        with torch.autocast(dt.device.type, enabled=False):  # fp32 throughout, like the inputs
            return SelectiveScanFunction._forward(ctx, dt, u, A, B, C, initial, reverse)

    @staticmethod
    def _forward(ctx, dt, u, A, B, C, initial, reverse):
        length = dt.shape[0]
        decay = torch.mul(dt.unsqueeze(-2), A).exp_()
        states = torch.mul((dt * u).unsqueeze(-2), B.unsqueeze(-1))  # the drive, scanned in place
        flat_initial = None if initial is None else initial.reshape(-1)
        _scan_(decay.view(length, -1), states.view(length, -1), flat_initial, reverse)
        y = torch.matmul(C.unsqueeze(-2), states).squeeze(-2)
        ctx.reverse = reverse
        ctx.save_for_backward(dt, u, A, B, C, initial, decay, states)
        return y, states[0 if reverse else -1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        with torch.autocast(grad_y.device.type, enabled=False):
            return SelectiveScanFunction._backward(ctx, grad_y.float(), grad_last)

    @staticmethod
    def _backward(ctx, grad_y, grad_last):
        dt, u, A, B, C, initial, decay, states = ctx.saved_tensors
        reverse = ctx.reverse
        length = dt.shape[0]
        # In scan order: `first` has no predecessor; every `step` follows `prev`.
        first, last = (length - 1, 0) if reverse else (0, length - 1)
        step = slice(None, -1) if reverse else slice(1, None)
        prev = slice(1, None) if reverse else slice(None, -1)

        # d loss / d drive_t: the direct term C_t * grad_y_t, then the later states' share.
        grad_y = grad_y.contiguous()  # arrives with the strides of y's permuted view
        grad_drive = torch.mul(grad_y.unsqueeze(-2), C.unsqueeze(-1))
        if grad_last is not None:
            grad_drive[last] += grad_last
        if length > 1:
            _scan_(
                decay[step].reshape(length - 1, -1),
                grad_drive[prev].view(length - 1, -1),
                grad_drive[last].reshape(-1),
                not reverse,
            )
        grad_C = torch.matmul(states, grad_y.unsqueeze(-1)).squeeze(-1)
        grad_B = torch.matmul(grad_drive, (dt * u).unsqueeze(-1)).squeeze(-1)
        grad_dt_u = torch.matmul(B.unsqueeze(-2), grad_drive).squeeze(-2)  # d loss / d (dt * u)
        grad_initial = None
        if initial is not None and ctx.needs_input_grad[5]:
            grad_initial = grad_drive[first] * decay[first]

        # d loss / d (dt * A) = grad_drive_t * decay_t * h_prev, in grad_drive's buffer (no longer needed):
        # the saved decays stay intact for another backward through a retained graph.
        grad_log_decay = grad_drive.mul_(decay)
        grad_log_decay[step].mul_(states[prev])
        if initial is None:
            grad_log_decay[first].zero_()
        else:
            grad_log_decay[first].mul_(initial)
        grad_dt = grad_dt_u * u
        for n in range(A.shape[1]):  # sum over N without a full-size temporary
            grad_dt.addcmul_(grad_log_decay[..., n, :], A[:, n])
        grad_A = grad_log_decay.mul_(dt.unsqueeze(-2)).sum((0, 1))
        return grad_dt, grad_dt_u * dt, grad_A, grad_B, grad_C, grad_initial, None


def scale_and_add(y: torch.Tensor, scale: float, add: Optional[torch.Tensor]) -> torch.Tensor:
    """``scale * y + add`` (the scan's ``output_scale`` and ``output_add``), skipping what is the identity.

    Backends without a fused version call it on their output.
    """
    if scale != 1.0:
        y = y * scale
    return y if add is None else y + add


# Values in each working buffer of the inference scan (4 MiB in fp32): on a
# 2-core EPYC (1 MiB L2 per core, 32 MiB L3) the DPMamba shapes run 4-25%
# slower with half or twice this (more Python steps, or fewer cache hits).
INFERENCE_BLOCK_VALUES = 2**20


def _even_part(total: int, most: int) -> int:
    """Part size that splits ``total`` into the fewest parts of at most ``most`` (at least 1), evenly.

    At least 1, also for ``total`` 0 (an empty batch), so that the sizes derived from it stay defined.
    """
    parts = max(1, -(-total // max(1, most)))
    return max(1, -(-total // parts))


def _softplus_exp2(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = max(x, 0) + ln 2 * log2(1 + 2^(-|x| log2 e))`` into a new tensor, as the Triton
    kernels compute it. PyTorch's CPU softplus goes through an unvectorised ``log1p``: on DPMamba-XS's dt
    (20000 x 256 fp32, 2 cores, the recipes' allocator setting) it took 26 ms, these vectorised passes
    10 ms. Below about -17 the result is 0 instead of ``exp(x) < 4e-8``; everywhere the absolute error
    stays within 1e-7 (the rounding of ``1 + 2^(...)``), small against step sizes of 1e-3 and up."""
    out = x.abs().mul_(-math.log2(math.e)).exp2_().add_(1.0).log2_().mul_(math.log(2.0))
    return out.add_(x.clamp(min=0.0))


def _selective_scan_inference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    initial_state: Optional[torch.Tensor],
    reverse: bool,
    output_scale: float,
    output_add: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_torch` without autograd: frame by frame, in cache-sized blocks.

    With nothing to keep for a backward pass, the decays and states exist for
    one block of frames x sequences at a time (``INFERENCE_BLOCK_VALUES`` each,
    in the CPU caches) instead of for the whole input (in DRAM, which bounds
    the chunked scan's speed). In each block, one op computes all decays, one
    all drives, one ``addcmul_`` per frame carries the state, and one ``bmm``
    contracts the states with ``C``; the block's last state enters the next.
    The tensors made for the whole input are ``(batch, L, channels)`` (``dt``,
    ``dt * u``, the gate, ``y``), in the channel-last layout of the transposed
    views :class:`~speechbrain_mamba.lobes.Mamba` passes: they are read without
    a copy, and ``y`` is returned in that layout.

    Arguments and returns are those of :func:`selective_scan_torch`.
    """
    batch, channels, length = u.shape
    groups, state_size = B.shape[1], A.shape[1]
    per_group = channels // groups
    frame = channels * state_size  # state values of one sequence at one frame
    rows = _even_part(batch, INFERENCE_BLOCK_VALUES // frame)
    frames = _even_part(length, INFERENCE_BLOCK_VALUES // (rows * frame))

    u_t = u.transpose(1, 2).float()  # (batch, L, channels) views: no copy for the lobes' inputs
    dt = delta.transpose(1, 2).float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = _softplus_exp2(dt)
    dt_u = (dt * u_t).unflatten(-1, (groups, 1, per_group))
    dt = dt.unflatten(-1, (groups, 1, per_group))
    B = B.float().permute(0, 3, 1, 2).unsqueeze(-1)  # (batch, L, groups, N, 1)
    C = C.float().permute(0, 3, 1, 2)
    # exp(dt * A) = exp2(dt * A * log2(e)): exp2 takes half exp's time on the CPU.
    A_log2 = (A.float().view(groups, per_group, state_size).transpose(1, 2) * math.log2(math.e)).contiguous()
    initial = None
    if initial_state is not None:
        initial = initial_state.float().view(batch, groups, per_group, state_size).transpose(2, 3)

    decay = u_t.new_empty(frames * rows * frame)
    # Two state buffers used in turn: a block's last state enters the next block.
    states = (u_t.new_empty(frames * rows * frame), u_t.new_empty(frames * rows * frame))
    y_block = u_t.new_empty(frames * rows * channels)
    y = u_t.new_empty(batch, length, channels)
    last_state = u_t.new_empty(batch, channels, state_size)
    starts = range(0, length, frames)
    for first in range(0, batch, rows):
        seqs = slice(first, first + rows)
        num_rows = min(rows, batch - first)
        state = None if initial is None else initial[seqs]
        for index, start in enumerate(reversed(starts) if reverse else starts):
            times = slice(start, start + frames)
            steps = min(frames, length - start)
            # Time-major (steps, rows, groups, N, P): every frame of a block is contiguous.
            shape = (steps, num_rows, groups, state_size, per_group)
            a = decay[: steps * num_rows * frame].view(shape)
            h = states[index % 2][: steps * num_rows * frame].view(shape)
            torch.mul(dt[seqs, times].transpose(0, 1), A_log2, out=a).exp2_()
            torch.mul(dt_u[seqs, times].transpose(0, 1), B[seqs, times].transpose(0, 1), out=h)
            h_frames, a_frames = h.unbind(0), a.unbind(0)  # cheaper than indexing every frame
            for t in range(steps - 1, -1, -1) if reverse else range(steps):
                if state is not None:
                    h_frames[t].addcmul_(a_frames[t], state)
                state = h_frames[t]
            y_out = y_block[: steps * num_rows * channels].view(steps, num_rows, channels)
            C_block = C[seqs, times].transpose(0, 1).reshape(-1, 1, state_size)
            torch.bmm(C_block, h.view(-1, state_size, per_group), out=y_out.view(-1, 1, per_group))
            y[seqs, times] = y_out.transpose(0, 1)
        last_state.view(batch, groups, per_group, state_size)[seqs] = state.transpose(-1, -2)

    # Whole-tensor passes: finishing each block's output in its loop step was 5-10% slower.
    if D is not None:
        y.addcmul_(u_t, D.float())
    if z is not None:
        y.mul_(F.silu(z.transpose(1, 2).float()))
    if output_add is not None:
        torch.add(output_add.transpose(1, 2), y, alpha=output_scale, out=y)  # add + scale * y
    elif output_scale != 1.0:
        y.mul_(output_scale)
    return y.transpose(1, 2).to(u.dtype), last_state


def selective_scan_torch(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale=1.0, output_add=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch implementation of :func:`speechbrain_mamba.ops.selective_scan`.

    Arguments are those of ``selective_scan`` with ``B`` and ``C`` shaped
    ``(batch, groups, N, L)``. Returns ``(y, last_state)``. Without autograd
    (no gradient enabled, or no input requiring one) the scan runs in
    cache-sized blocks instead (:func:`_selective_scan_inference`).
    """
    if not needs_autograd(u, delta, A, B, C, D, z, delta_bias, initial_state, output_add):
        return _selective_scan_inference(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale, output_add
        )

    batch, channels, length = u.shape
    groups, state_size = B.shape[1], A.shape[1]
    per_group = channels // groups
    # Time-major [L, batch, groups, channels per group]: one scan step reads
    # one contiguous block, and B/C broadcast over the channels of their group.
    grouped = (length, batch, groups, per_group)

    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.permute(2, 0, 1).contiguous().view(grouped)
    u_t = u.float().permute(2, 0, 1).contiguous().view(grouped)
    B_t = B.float().permute(3, 0, 1, 2).contiguous()
    C_t = C.float().permute(3, 0, 1, 2).contiguous()
    A_t = A.float().view(groups, per_group, state_size).transpose(1, 2).contiguous()
    initial = None
    if initial_state is not None:
        initial = initial_state.float().view(batch, groups, per_group, state_size).transpose(2, 3).contiguous()
    y, last_state = SelectiveScanFunction.apply(dt, u_t, A_t, B_t, C_t, initial, reverse)
    y = y.view(length, batch, channels).permute(1, 2, 0)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = scale_and_add(y, output_scale, output_add)
    return y.to(u.dtype), last_state.transpose(2, 3).reshape(batch, channels, state_size)
