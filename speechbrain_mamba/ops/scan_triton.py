"""Selective scan as Triton kernels: fused forward and backward, O(L / BLOCK_L) extra memory.

Two families of kernels, chosen per call from the number of (sequence,
channel) rows (``ScanConfig``):

- Frame by frame (``_scan_fwd_sequential_kernel``, ``_scan_bwd_sequential_kernel``):
  one program keeps the ``(channels, N)`` state of its channel block in
  registers and reads each frame once, a few frames ahead of its arithmetic
  (the frames' memory latency, not arithmetic, bounds these kernels); the
  backward kernel takes a chunk in parts of a few frames, recomputes a part's
  states into a small per-program scratch slot and walks the adjoint back
  through them. DPMamba's many intra- and
  inter-chunk sequences take both. SepMamba's few long sequences take both
  over segments of time: forward, each segment starts from the summaries (end
  state, total decay ``exp(A sum(dt))``) of the segments before it; backward,
  from the adjoint summaries of the segments after it.
- Chunked (``_scan_fwd_kernel``, ``_scan_bwd_kernel``): one program owns
  ``BLOCK_E`` channels of one sequence and walks it in chunks of ``BLOCK_L``
  frames. In a chunk it loads ``u, delta, z`` as ``(BLOCK_E, BLOCK_L)`` tiles,
  then, one state ``n`` at a time, forms ``dA = exp(dt A_n)`` and ``dt B_n u``
  and scans them along time with ``tl.associative_scan`` and the pair combine
  ``(a1 a2, b1 a2 + b2)``. Few long sequences would leave most of the GPU idle
  with one program per channel block, so time is split into segments: a first
  launch scans every segment from a zero state and keeps only its total decay
  and end state; the main launch starts each segment from the state those
  summaries give; the backward pass does the same for the adjoint. The
  default configurations take the frame-by-frame kernels for every shape;
  these run when ``sequential_split_programs`` is 0 (``ScanConfig``).

Both fuse ``dt = softplus(delta + delta_bias)``, the ``D`` skip, the
``silu(z)`` gate and the output's scale and added tensor (BiMamba averages its
two directions this way); ``reverse`` reads the frames from the end, so no
flipped copy is made.

Training memory: the forward pass keeps only the state entering each chunk of
``BLOCK_L`` frames after the first (the first chunk's is the initial state),
``(batch, E, ceil(L / BLOCK_L) - 1, N)`` fp32; the frame-by-frame kernels, when
both passes take them, store one every ``sequential_block_l`` frames (64). The
backward pass recomputes the states of a chunk (or of a part of it) from it,
then runs the adjoint recurrence ``g_t = C_t dout_t + dA_{t+1} g_{t+1}``
through them in the opposite order. Every term of the gradient that needs
``h_{t-1}`` needs it multiplied by ``dA_t``, which is ``h_t - dt_t B_t u_t``:
no shifted copy of the states is needed.

Gradients of ``B`` and ``C`` sum over channels: the chunked backward kernel adds
each channel block's share into an fp32 buffer with atomic adds (so their last
bits vary from run to run), the frame-by-frame one writes per-block shares that
are summed afterwards. ``A``, ``D`` and ``delta_bias`` are summed with atomic
adds over the sequences.

Outputs and gradients are written in the layout of their inputs, so the mixer's
channel-last activations (frames of its projections) stay channel-last.

Speed on an H100 (benchmarks/results/scan_prefetch_h100_2026-11-24.md,
scan_split_h100_2026-11-24.md, scan_backward_2026-11-24_h100/,
scan_chunk_states_2026-11-24_h100/, sepmamba_backward_split_2026-11-24_h100/,
scan_scratch_parts_2026-11-25_h100/): forward 0.1-0.8 ms on DPMamba-M's 4-60 s
shapes, up to 1.6 TB/s in fp32; the backward alone 0.4-5.2 ms, 3.5-7x the
forward: forward + backward reach 2-13 % of the memory bandwidth. On SepMamba-M's
stages, the segmented frame-by-frame backward is 2-4x faster than the chunked one.
"""

import functools
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from speechbrain_mamba.ops.grad_mode import needs_autograd
from speechbrain_mamba.ops.triton_support import cdiv, check_32bit_offsets, interpreting, next_power_of_2

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Triton's interpreter has no libdevice: the interpreted kernels take tl.log2 (see _dt).
_LIBDEVICE = tl.constexpr(not interpreting())
# How many frames ahead the backward kernel's adjoint walk loads a frame: 2 or 4 were slower (each frame
# in the queue holds its recomputed state tile; benchmarks/results/scan_prefetch_h100_2026-11-24.md, which
# changed both of the kernel's walks together). Changed alone, 2 and 3 were no faster (-1 to +17 %) on
# DPMamba-M's 4 s (batch 4) and 60 s shapes, bf16 and fp32 (H100, 2026-11-25, module copies timed by
# scan_backward_ablation.times in a throwaway script).
_ADJOINT_PREFETCH = tl.constexpr(1)


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes and launch shape of the Triton scan.

    Arguments
    ---------
    block_e : int
        Channels per program (a power of two; lowered to divide the channels
        of a B/C group).
    block_l : int
        Frames per chunk (a power of two; a smaller power of two, at least
        16, when it pads fewer frames).
    num_warps : int
        Warps per program.
    min_programs : int
        Split the sequence into segments until about this many programs run;
        0 never splits.
    min_segment_chunks : int
        Fewest chunks in one segment.
    sequential_block_l : int
        Frames per chunk when the frame-by-frame kernels run both passes (a
        power of two; a smaller one, at least 16, when it pads fewer frames):
        the forward pass stores the state entering each chunk, the backward
        pass recomputes a chunk's states into its scratch slot. Longer chunks
        store fewer states (DPMamba's 34-frame inter-chunk sequences: none).
    sequential_min_rows : int
        Walk time frame by frame (``_scan_fwd_sequential_kernel``,
        ``_scan_bwd_sequential_kernel``) when there are at least this many
        (sequence, channel) rows, enough programs to keep the GPU busy
        without splitting time; 0: never without splitting (see
        ``sequential_split_programs``).
    sequential_block_e : int
        Channels per program of the frame-by-frame kernels.
    sequential_wide_min_rows : int
        Below this many rows, the frame-by-frame kernels give each program
        half of ``sequential_block_e`` channels: twice the programs to hide
        the memory latency of the frames.
    sequential_split_programs : int
        Below ``sequential_min_rows`` (or when it is 0), the frame-by-frame
        kernels still run, with time split into segments until about this
        many programs run; 0: the chunked kernels run instead.
    sequential_scratch_l : int
        Frames whose recomputed states the frame-by-frame backward kernel
        parks in its scratch slot at once (a power of two; clamped to the
        chunk): it takes each chunk in parts of this many frames, after walks
        through the chunk that find the state entering each part. A smaller
        slot, for the cost of those walks.
    sequential_num_warps : int
        Warps per program of the frame-by-frame backward kernel (the forward one uses 1).
    sequential_prefetch : int
        How many frames ahead of their arithmetic the frame-by-frame kernels
        load a frame (at least 1; in the backward kernel: in the walks that
        recompute states, where the queue of loaded frames restarts in each
        part of a chunk; its adjoint walk loads 1 frame ahead).
    sequential_unroll : int
        Frames unrolled per loop step of the frame-by-frame forward kernel and
        of the backward kernel's recomputing walks (a power of two; lowered to
        a chunk's frames, and in the backward kernel to ``sequential_scratch_l``).
    """

    block_e: int = 16
    block_l: int = 32
    num_warps: int = 4
    min_programs: int = 1024
    min_segment_chunks: int = 4
    sequential_block_l: int = 64
    sequential_min_rows: int = 8192
    sequential_block_e: int = 16
    sequential_wide_min_rows: int = 0
    sequential_split_programs: int = 0
    sequential_scratch_l: int = 8
    sequential_num_warps: int = 1
    sequential_prefetch: int = 4
    sequential_unroll: int = 8

    def __post_init__(self):
        powers_of_two = ("block_e", "block_l", "sequential_block_l", "sequential_block_e", "sequential_unroll",
                         "sequential_scratch_l")
        for name in powers_of_two:
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanConfig.{name} must be a power of two; got {value}.")
        if self.sequential_prefetch < 1:
            raise ValueError(f"ScanConfig.sequential_prefetch must be at least 1; got {self.sequential_prefetch}.")


# The chunked kernels' tiles (block_e, block_l, num_warps): measured best for forward + backward on
# DPMamba's and SepMamba's shapes (H100, see benchmarks/gpu_scan_kernels.py --sweep): few lanes along
# time keep the scan's shuffles few.
#
# The frame-by-frame forward kernel (H100, benchmarks/results/scan_prefetch_h100_2026-11-24.md): 32
# channels per program, frames loaded 4 ahead, 8 unrolled per step: 1.9-2.0x faster than without
# prefetching on DPMamba-M's 60 s shapes; 16-bit inputs with fewer than 32768 rows (DPMamba-M's 4 s
# intra-chunk scan has 16896) are faster with 16 channels per program. Few long sequences are split
# in time until about 2048 programs run (scan_split_h100_2026-11-24.md: 2-8x faster than the chunked
# kernel on SepMamba-M's stages; no program target wins on every shape).
FORWARD_CONFIG = ScanConfig(sequential_block_e=32, sequential_wide_min_rows=32768, sequential_split_programs=2048)
FORWARD_CONFIG_FP32 = replace(FORWARD_CONFIG, sequential_wide_min_rows=0)
# The backward pass reuses the forward pass's chunks: its block_l is not read. Its recomputing walk
# loads frames 4 ahead and unrolls 8 per step, as the forward kernel: 2-12 % faster than 1 ahead
# without unrolling on DPMamba-M's shapes (benchmarks/results/scan_backward_2026-11-24_h100/). Few long
# sequences (SepMamba) are split in time for the frame-by-frame backward kernel too. Chunks are taken
# in parts of 8 frames (sequential_scratch_l): 2-14 % faster than whole 64-frame chunks on DPMamba-M's
# shapes; SepMamba-M's training step, whose 32-frame chunks had a smaller slot, 1-3 % slower
# (benchmarks/results/scan_scratch_parts_2026-11-25_h100/).
BACKWARD_CONFIG = ScanConfig(sequential_prefetch=4, sequential_unroll=8, sequential_split_programs=2048)


@triton.jit
def _pair_combine(a_prev, b_prev, a_next, b_next):
    # (a_prev, b_prev) then (a_next, b_next): h -> a_next (a_prev h + b_prev) + b_next.
    return a_prev * a_next, b_prev * a_next + b_next


@triton.jit
def _dt(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """dt = softplus(delta + bias) in fp32, and d dt / d delta.

    ``FAST`` (the backward kernels) takes the log on the special function unit (``lg2.approx``, an error
    of about 2**-22 next to the 2**-24 rounding of ``1 + exp(-|x|)`` that both forms share) instead of
    ``tl.log2``'s polynomial of about 20 instructions, and the slope from the softplus's exponential (no
    overflow: the exponential stays in (0, 1]). The backward kernels, which recompute dt in up to three
    walks per frame, ran 3-11 % faster with it; the forward kernel, the same code, took up to 1.5x as long
    in bf16 with 32-channel programs (H100, benchmarks/results/scan_fast_log_2026-11-25_h100/), so it
    keeps the polynomial. Triton's interpreter has no libdevice: only the GPU tests reach the fast log.
    """
    if HAS_BIAS:
        delta = delta + bias[:, None]
    if SOFTPLUS:
        # max(x, 0) + log(1 + exp(-|x|)), in base 2 for the special function unit.
        decay = tl.exp2(-tl.abs(delta) * _LOG2E)
        if FAST and _LIBDEVICE:
            dt = tl.maximum(delta, 0.0) + _LN2 * libdevice.fast_log2f(1.0 + decay)
        else:
            dt = tl.maximum(delta, 0.0) + _LN2 * tl.log2(1.0 + decay)
        if FAST:
            slope = tl.where(delta >= 0.0, 1.0, decay) / (1.0 + decay)
        else:
            # The forward kernels discard the slope; in this form they compile to the code that was
            # measured (the shared-exponential form changed their register allocation).
            slope = 1.0 / (1.0 + tl.exp2(-delta * _LOG2E))
    else:
        dt = delta
        slope = tl.full(delta.shape, 1.0, tl.float32)
    return dt, slope


@triton.jit
def _last(tile, offs_l, position):
    """Column ``position`` of a ``(BLOCK_E, BLOCK_L)`` tile."""
    return tl.sum(tl.where(offs_l[None, :] == position, tile, 0.0), axis=1)


@triton.jit
def _state_column(states, offs_n, n):
    """State ``n`` of a ``(BLOCK_E, BLOCK_N)`` tile of states."""
    return tl.sum(tl.where(offs_n[None, :] == n, states, 0.0), axis=1)


@triton.jit
def _set_state_column(states, offs_n, n, column):
    return tl.where(offs_n[None, :] == n, column[:, None], states)


@triton.jit
def _channel_block(num_eblocks, per_group, N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's work in every scan kernel: program ``(pid, seg)`` owns channel block
    ``pid % num_eblocks`` of sequence ``pid // num_eblocks`` in segment ``seg``. Returns ``pid``, the
    sequence, the segment, the block's channels, the states (and their mask) and the B/C group."""
    pid = tl.program_id(0)
    first_channel = (pid % num_eblocks) * BLOCK_E
    offs_e = first_channel + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    return pid, pid // num_eblocks, tl.program_id(1), offs_e, offs_n, offs_n < N, first_channel // per_group


@triton.jit
def _channel_bias(bias_ptr, offs_e, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr):
    """The dt bias of the block's channels in fp32 (zeros without one)."""
    bias = tl.zeros([BLOCK_E], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_e).to(tl.float32)
    return bias


@triton.jit
def _segment_start_state(h0_ptr, seg_decay_ptr, seg_state_ptr, state_offs, pid_b, offs_e, offs_n, en_mask, E, N, seg,
                         num_seg, HAS_H0: tl.constexpr, SUMMARY: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """State entering segment `seg`: zero for a summary pass, otherwise the initial state carried through the
    (decay, end state) summaries of the earlier segments in scan order."""
    state = tl.zeros([BLOCK_E, BLOCK_N], tl.float32)
    if not SUMMARY:
        if HAS_H0:
            state = tl.load(h0_ptr + state_offs, mask=en_mask, other=0.0).to(tl.float32)
        for j in range(0, seg):
            seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + j) * N + offs_n[None, :]
            state = tl.load(seg_decay_ptr + seg_offs, mask=en_mask, other=1.0) * state + tl.load(
                seg_state_ptr + seg_offs, mask=en_mask, other=0.0)
    return state


@triton.jit
def _chunk_state_offsets(rows, k, num_chunks, cols, N: tl.constexpr):
    """Where the state entering chunk ``k`` (> 0) of ``rows`` (``pid_b * E + channel``) is stored: the
    first chunk's, the initial state, is not."""
    return (rows * (num_chunks - 1) + k - 1) * N + cols


@triton.jit
def _chunk_entering_state(chunk_ptr, h0_ptr, rows, k, num_chunks, cols, mask, N: tl.constexpr,
                          HAS_H0: tl.constexpr):
    """The state entering chunk ``k`` in fp32: stored, or for the first chunk the initial state (zeros
    without one)."""
    state = tl.load(chunk_ptr + _chunk_state_offsets(rows, k, num_chunks, cols, N), mask=mask & (k > 0),
                    other=0.0)
    if HAS_H0:
        state += tl.load(h0_ptr + rows * N + cols, mask=mask & (k == 0), other=0.0).to(tl.float32)
    return state


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, add_ptr,
    y_ptr, last_ptr, chunk_ptr, seg_decay_ptr, seg_state_ptr,
    E, L, per_group, num_eblocks, num_chunks, chunks_per_seg, num_seg, out_scale,
    su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sa_b, sa_e, sa_l, sy_b, sy_e, sy_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_ADD: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, SUMMARY: tl.constexpr,
    STORE_CHUNKS: tl.constexpr,
):
    """Forward scan of one channel block over one segment of one sequence.

    ``SUMMARY``: scan the segment from a zero state and store only its total
    decay and end state. Otherwise start from the state the earlier segments'
    summaries give, store ``y``, the chunk-entering states (``STORE_CHUNKS``)
    and, in the last segment, the last state.
    """
    pid, pid_b, seg, offs_e, offs_n, n_mask, group = _channel_block(num_eblocks, per_group, N, BLOCK_E, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    en_mask = n_mask[None, :]
    LAST: tl.constexpr = 0 if REVERSE else BLOCK_L - 1

    bias = _channel_bias(bias_ptr, offs_e, HAS_BIAS, BLOCK_E)
    if HAS_D:
        D = tl.load(D_ptr + offs_e).to(tl.float32)

    u_row = u_ptr + pid_b * su_b + offs_e[:, None] * su_e
    d_row = delta_ptr + pid_b * sd_b + offs_e[:, None] * sd_e
    z_row = z_ptr + pid_b * sz_b + offs_e[:, None] * sz_e
    add_row = add_ptr + pid_b * sa_b + offs_e[:, None] * sa_e
    y_row = y_ptr + pid_b * sy_b + offs_e[:, None] * sy_e
    B_seq = B_ptr + pid_b * sB_b + group * sB_g
    C_seq = C_ptr + pid_b * sC_b + group * sC_g
    state_offs = (pid_b * E + offs_e[:, None]) * N + offs_n[None, :]

    # States are carried between chunks as a (BLOCK_E, BLOCK_N) tile.
    state = _segment_start_state(h0_ptr, seg_decay_ptr, seg_state_ptr, state_offs, pid_b, offs_e, offs_n, en_mask, E,
                                 N, seg, num_seg, HAS_H0, SUMMARY, BLOCK_E, BLOCK_N)
    decay = tl.full([BLOCK_E, BLOCK_N], 1.0, tl.float32)

    k_begin = seg * chunks_per_seg
    k_end = tl.minimum(k_begin + chunks_per_seg, num_chunks)
    for k in range(k_begin, k_end):
        if STORE_CHUNKS:
            tl.store(chunk_ptr + _chunk_state_offsets(pid_b * E + offs_e[:, None], k, num_chunks, offs_n[None, :], N),
                     state, mask=en_mask & (k > 0))
        if REVERSE:
            t = L - (k + 1) * BLOCK_L + offs_l
        else:
            t = k * BLOCK_L + offs_l
        mask_t = (t >= 0) & (t < L)
        mask_et = mask_t[None, :]
        u = tl.load(u_row + t[None, :] * su_l, mask=mask_et, other=0.0).to(tl.float32)
        delta = tl.load(d_row + t[None, :] * sd_l, mask=mask_et, other=0.0).to(tl.float32)
        dt, _ = _dt(delta, bias, HAS_BIAS, SOFTPLUS, False)
        dt = tl.where(mask_et, dt, 0.0)  # padding frames: dA = 1, no input
        dtu = dt * u
        out = tl.zeros([BLOCK_E, BLOCK_L], tl.float32)
        # One (BLOCK_E, BLOCK_L) scan per state: the frames of a thread are contiguous,
        # so most of the scan runs inside threads, and y needs no reduction.
        for n in range(N):
            A_n = tl.load(A_ptr + offs_e * N + n).to(tl.float32) * _LOG2E
            B_n = tl.load(B_seq + n * sB_n + t * sB_l, mask=mask_t, other=0.0).to(tl.float32)
            dA = tl.exp2(dt * A_n[:, None])
            dA_cum, h = tl.associative_scan((dA, dtu * B_n[None, :]), 1, _pair_combine, reverse=REVERSE)
            h = dA_cum * _state_column(state, offs_n, n)[:, None] + h
            state = _set_state_column(state, offs_n, n, _last(h, offs_l, LAST))
            if SUMMARY:
                decay = _set_state_column(decay, offs_n, n,
                                          _state_column(decay, offs_n, n) * _last(dA_cum, offs_l, LAST))
            else:
                C_n = tl.load(C_seq + n * sC_n + t * sC_l, mask=mask_t, other=0.0).to(tl.float32)
                out += h * C_n[None, :]
        if not SUMMARY:
            if HAS_D:
                out += D[:, None] * u
            if HAS_Z:
                z = tl.load(z_row + t[None, :] * sz_l, mask=mask_et, other=0.0).to(tl.float32)
                out = out * z / (1.0 + tl.exp2(-z * _LOG2E))
            out *= out_scale
            if HAS_ADD:
                out += tl.load(add_row + t[None, :] * sa_l, mask=mask_et, other=0.0).to(tl.float32)
            tl.store(y_row + t[None, :] * sy_l, out.to(y_ptr.dtype.element_ty), mask=mask_et)

    if SUMMARY:
        seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + seg) * N + offs_n[None, :]
        tl.store(seg_decay_ptr + seg_offs, decay, mask=en_mask)
        tl.store(seg_state_ptr + seg_offs, state, mask=en_mask)
    elif seg == num_seg - 1:
        tl.store(last_ptr + state_offs, state, mask=en_mask)


@triton.jit
def _frame_time(j, L, REVERSE: tl.constexpr):
    """Time index of the ``j``-th frame in scan order."""
    if REVERSE:
        return L - 1 - j
    else:
        return j


@triton.jit
def _load_frame(t, L, u_row, d_row, z_row, extra_row, B_seq, C_seq, su_l, sd_l, sz_l, sx_l, sB_l, sC_l, n_mask,
                in_slot, LOAD_C: tl.constexpr, HAS_Z: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """Frame ``t``'s inputs of a channel block, in fp32: ``u, delta, B, C, z`` and one more per-channel
    input (the forward's added tensor, the backward's ``dy``); zeros outside ``[0, L)`` and where
    ``in_slot`` is false. Inputs not asked for are ``u`` as a placeholder."""
    valid = (t >= 0) & (t < L) & in_slot
    u = tl.load(u_row + t * su_l, mask=valid, other=0.0).to(tl.float32)
    delta = tl.load(d_row + t * sd_l, mask=valid, other=0.0).to(tl.float32)
    B_t = tl.load(B_seq + t * sB_l, mask=n_mask & valid, other=0.0).to(tl.float32)
    C_t = u
    if LOAD_C:
        C_t = tl.load(C_seq + t * sC_l, mask=n_mask & valid, other=0.0).to(tl.float32)
    z = u
    if HAS_Z:
        z = tl.load(z_row + t * sz_l, mask=valid, other=0.0).to(tl.float32)
    extra = u
    if HAS_EXTRA:
        extra = tl.load(extra_row + t * sx_l, mask=valid, other=0.0).to(tl.float32)
    return u, delta, B_t, C_t, z, extra


@triton.jit
def _steps_in_chunk(k, L, BLOCK_L: tl.constexpr, UNROLL: tl.constexpr):
    """Steps of ``UNROLL`` frames that cover chunk ``k``'s frames inside the sequence: a short sequence's
    padding frames, which would change nothing, are not walked (DPMamba's 34-frame inter-chunk
    sequences in 64-frame chunks walk 40 frames, not 64)."""
    return (tl.minimum(L - k * BLOCK_L, BLOCK_L) + UNROLL - 1) // UNROLL


@triton.jit
def _scan_fwd_sequential_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, add_ptr,
    y_ptr, last_ptr, chunk_ptr, seg_decay_ptr, seg_state_ptr,
    E, L, per_group, num_eblocks, num_chunks, chunks_per_seg, num_seg, out_scale,
    su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sa_b, sa_e, sa_l, sy_b, sy_e, sy_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_ADD: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, SUMMARY: tl.constexpr,
    STORE_CHUNKS: tl.constexpr,
):
    """Forward scan of one channel block over one segment of one sequence, one frame at a time.

    The ``(BLOCK_E, N)`` state stays in registers and each frame is read once:
    no scan tree, no per-state loop. A frame's loads are issued ``PREFETCH``
    frames ahead of its arithmetic: issued after the previous frame's store,
    they could not be moved above it (the compiler cannot rule out that the
    store aliases them) and every frame would wait a full memory latency.
    ``UNROLL`` frames (a divisor of ``BLOCK_L``) are unrolled per loop step:
    more makes compilation much slower (superlinearly) for little gain.
    Same outputs, chunk-entering states included, as ``_scan_fwd_kernel``; it
    needs many programs to keep the GPU busy. DPMamba's intra and inter scans
    have enough sequences x channel blocks; SepMamba's few long sequences are
    split into segments as in ``_scan_fwd_kernel``: ``SUMMARY`` scans a
    segment from a zero state and stores its end state and its total decay
    ``exp(A sum(dt))``; the main launch starts each segment from the state the
    earlier segments' summaries give.
    """
    pid, pid_b, seg, offs_e, offs_n, n_mask, group = _channel_block(num_eblocks, per_group, N, BLOCK_E, BLOCK_N)
    en_mask = n_mask[None, :]

    bias = _channel_bias(bias_ptr, offs_e, HAS_BIAS, BLOCK_E)
    if HAS_D:
        D = tl.load(D_ptr + offs_e).to(tl.float32)
    A2 = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=en_mask, other=0.0).to(tl.float32) * _LOG2E

    u_row = u_ptr + pid_b * su_b + offs_e * su_e
    d_row = delta_ptr + pid_b * sd_b + offs_e * sd_e
    z_row = z_ptr + pid_b * sz_b + offs_e * sz_e
    add_row = add_ptr + pid_b * sa_b + offs_e * sa_e
    y_row = y_ptr + pid_b * sy_b + offs_e * sy_e
    B_seq = B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n
    C_seq = C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n
    state_offs = (pid_b * E + offs_e[:, None]) * N + offs_n[None, :]

    state = _segment_start_state(h0_ptr, seg_decay_ptr, seg_state_ptr, state_offs, pid_b, offs_e, offs_n, en_mask, E,
                                 N, seg, num_seg, HAS_H0, SUMMARY, BLOCK_E, BLOCK_N)
    dt_sum = tl.zeros([BLOCK_E, 1], tl.float32)
    # A summary needs no output: its loads of C, z and the added tensor are left out.
    LOAD_OUTPUT_INPUTS: tl.constexpr = not SUMMARY
    LOAD_Z: tl.constexpr = HAS_Z and not SUMMARY
    LOAD_ADD: tl.constexpr = HAS_ADD and not SUMMARY
    k_begin = seg * chunks_per_seg
    k_end = tl.minimum(k_begin + chunks_per_seg, num_chunks)
    # The inputs of the next PREFETCH frames in scan order, oldest first.
    ahead = ()
    for j in tl.static_range(PREFETCH):
        ahead = ahead + (_load_frame(_frame_time(k_begin * BLOCK_L + j, L, REVERSE), L, u_row, d_row, z_row, add_row,
                                     B_seq, C_seq, su_l, sd_l, sz_l, sa_l, sB_l, sC_l, n_mask, True,
                                     LOAD_OUTPUT_INPUTS, LOAD_Z, LOAD_ADD),)
    for k in range(k_begin, k_end):
        if STORE_CHUNKS:
            tl.store(chunk_ptr + _chunk_state_offsets(pid_b * E + offs_e[:, None], k, num_chunks, offs_n[None, :], N),
                     state, mask=en_mask & (k > 0))
        for step in range(0, _steps_in_chunk(k, L, BLOCK_L, UNROLL)):
            for i in tl.static_range(UNROLL):
                frame = k * BLOCK_L + step * UNROLL + i  # index in scan order
                t = _frame_time(frame, L, REVERSE)
                valid = (t >= 0) & (t < L)
                u, delta, B_t, C_t, z, add = ahead[0]
                ahead = ahead[1:] + (_load_frame(_frame_time(frame + PREFETCH, L, REVERSE), L, u_row, d_row, z_row,
                                                 add_row, B_seq, C_seq, su_l, sd_l, sz_l, sa_l, sB_l, sC_l, n_mask,
                                                 True, LOAD_OUTPUT_INPUTS, LOAD_Z, LOAD_ADD),)
                dt, _ = _dt(delta[:, None], bias, HAS_BIAS, SOFTPLUS, False)
                dt = tl.where(valid, dt, 0.0)  # padding frames: dA = 1, no input
                state = tl.exp2(dt * A2) * state + (dt * u[:, None]) * B_t[None, :]
                if SUMMARY:
                    dt_sum += dt
                else:
                    out = tl.sum(state * C_t[None, :], axis=1)
                    if HAS_D:
                        out += D * u
                    if HAS_Z:
                        out = out * z / (1.0 + tl.exp2(-z * _LOG2E))
                    out *= out_scale
                    if HAS_ADD:
                        out += add
                    tl.store(y_row + t * sy_l, out.to(y_ptr.dtype.element_ty), mask=valid)
    if SUMMARY:
        # The product of the segment's decays exp2(dt A2) is exp2(A2 sum(dt)).
        seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + seg) * N + offs_n[None, :]
        tl.store(seg_decay_ptr + seg_offs, tl.exp2(dt_sum * A2), mask=en_mask)
        tl.store(seg_state_ptr + seg_offs, state, mask=en_mask)
    elif seg == num_seg - 1:
        tl.store(last_ptr + state_offs, state, mask=en_mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, dy_ptr, dlast_ptr, chunk_ptr,
    seg_decay_ptr, seg_grad_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    E, L, per_group, groups, num_eblocks, num_chunks, chunks_per_seg, num_seg, out_scale,
    su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sy_b, sy_e, sy_l,
    sdu_b, sdu_e, sdu_l, sdd_b, sdd_e, sdd_l, sdz_b, sdz_e, sdz_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, SUMMARY: tl.constexpr,
    STORE_DH0: tl.constexpr,
):
    """Backward pass of one channel block over one segment of one sequence.

    The adjoint is carried between chunks as ``q = dA_first * g_first``, the
    gradient of the state entering a chunk. ``SUMMARY``: run the adjoint alone
    through the segment from ``q = 0`` and store its total decay and resulting
    ``q``. Otherwise start from the ``q`` the later segments give and compute
    every gradient.
    """
    pid, pid_b, seg, offs_e, offs_n, n_mask, group = _channel_block(num_eblocks, per_group, N, BLOCK_E, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    en_mask = n_mask[None, :]
    FIRST: tl.constexpr = BLOCK_L - 1 if REVERSE else 0
    # The frame after each frame in scan order, if it lies in the same chunk.
    STEP: tl.constexpr = -1 if REVERSE else 1
    offs_next = offs_l + STEP
    next_in_chunk = (offs_next >= 0) & (offs_next < BLOCK_L)

    bias = _channel_bias(bias_ptr, offs_e, HAS_BIAS, BLOCK_E)
    if HAS_D:
        D = tl.load(D_ptr + offs_e).to(tl.float32)

    u_row = u_ptr + pid_b * su_b + offs_e[:, None] * su_e
    d_row = delta_ptr + pid_b * sd_b + offs_e[:, None] * sd_e
    z_row = z_ptr + pid_b * sz_b + offs_e[:, None] * sz_e
    dy_row = dy_ptr + pid_b * sy_b + offs_e[:, None] * sy_e
    du_row = du_ptr + pid_b * sdu_b + offs_e[:, None] * sdu_e
    dd_row = ddelta_ptr + pid_b * sdd_b + offs_e[:, None] * sdd_e
    dz_row = dz_ptr + pid_b * sdz_b + offs_e[:, None] * sdz_e
    B_seq = B_ptr + pid_b * sB_b + group * sB_g
    C_seq = C_ptr + pid_b * sC_b + group * sC_g
    bc_grad_seq = (pid_b * groups + group) * N * L  # dB, dC: contiguous fp32
    rows = pid_b * E + offs_e
    state_offs = (pid_b * E + offs_e[:, None]) * N + offs_n[None, :]

    q = tl.zeros([BLOCK_E, BLOCK_N], tl.float32)
    decay = tl.full([BLOCK_E, BLOCK_N], 1.0, tl.float32)
    if not SUMMARY:
        if HAS_DLAST:
            q = tl.load(dlast_ptr + state_offs, mask=en_mask, other=0.0).to(tl.float32)
        # Later segments (in scan order) pass their adjoint back to this one.
        for i in range(0, num_seg - 1 - seg):
            j = num_seg - 1 - i
            seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + j) * N + offs_n[None, :]
            q = tl.load(seg_decay_ptr + seg_offs, mask=en_mask, other=1.0) * q + tl.load(
                seg_grad_ptr + seg_offs, mask=en_mask, other=0.0
            )
    grad_A = tl.zeros([BLOCK_E, BLOCK_N], tl.float32)
    grad_D = tl.zeros([BLOCK_E], tl.float32)
    grad_bias = tl.zeros([BLOCK_E], tl.float32)

    k_begin = seg * chunks_per_seg
    k_end = tl.minimum(k_begin + chunks_per_seg, num_chunks)
    for i in range(0, k_end - k_begin):
        k = k_end - 1 - i
        if REVERSE:
            start = L - (k + 1) * BLOCK_L
        else:
            start = k * BLOCK_L
        t = start + offs_l
        mask_t = (t >= 0) & (t < L)
        mask_et = mask_t[None, :]
        t_next = start + offs_next
        mask_next = (next_in_chunk & (t_next >= 0) & (t_next < L))[None, :]

        delta = tl.load(d_row + t[None, :] * sd_l, mask=mask_et, other=0.0).to(tl.float32)
        dt, slope = _dt(delta, bias, HAS_BIAS, SOFTPLUS, True)
        dt = tl.where(mask_et, dt, 0.0)
        delta_next = tl.load(d_row + t_next[None, :] * sd_l, mask=mask_next, other=0.0).to(tl.float32)
        dt_next, _ = _dt(delta_next, bias, HAS_BIAS, SOFTPLUS, True)
        dt_next = tl.where(mask_next, dt_next, 0.0)  # dA_next = 1 at the chunk's end
        dy = tl.load(dy_row + t[None, :] * sy_l, mask=mask_et, other=0.0).to(tl.float32) * out_scale
        if HAS_Z:
            z = tl.load(z_row + t[None, :] * sz_l, mask=mask_et, other=0.0).to(tl.float32)
            sig_z = 1.0 / (1.0 + tl.exp2(-z * _LOG2E))
            dout = dy * z * sig_z
        else:
            dout = dy
        if not SUMMARY:
            u = tl.load(u_row + t[None, :] * su_l, mask=mask_et, other=0.0).to(tl.float32)
            dtu = dt * u
            g_B = tl.zeros([BLOCK_E, BLOCK_L], tl.float32)  # sum_n g B
            g_decay = tl.zeros([BLOCK_E, BLOCK_L], tl.float32)  # sum_n g A dA h_prev
            out = tl.zeros([BLOCK_E, BLOCK_L], tl.float32)  # sum_n C h
        for n in range(N):
            A_n = tl.load(A_ptr + offs_e * N + n).to(tl.float32)
            C_n = tl.load(C_seq + n * sC_n + t * sC_l, mask=mask_t, other=0.0).to(tl.float32)
            dA = tl.exp2(dt * (A_n * _LOG2E)[:, None])
            dA_next = tl.exp2(dt_next * (A_n * _LOG2E)[:, None])
            # Adjoint through the chunk, against scan order: g_t = C_t dout_t + dA_{t+1} g_{t+1}.
            g_cum, g = tl.associative_scan((dA_next, dout * C_n[None, :]), 1, _pair_combine,
                                           reverse=not REVERSE)
            g = g_cum * _state_column(q, offs_n, n)[:, None] + g
            q = _set_state_column(q, offs_n, n, _last(g * dA, offs_l, FIRST))
            if SUMMARY:
                decay = _set_state_column(decay, offs_n, n,
                                          _state_column(decay, offs_n, n) * _last(dA * g_cum, offs_l, FIRST))
            else:
                B_n = tl.load(B_seq + n * sB_n + t * sB_l, mask=mask_t, other=0.0).to(tl.float32)
                h_in = _chunk_entering_state(chunk_ptr, h0_ptr, rows, k, num_chunks, n, offs_e >= 0, N, HAS_H0)
                drive = dtu * B_n[None, :]
                h_cum, h = tl.associative_scan((dA, drive), 1, _pair_combine, reverse=REVERSE)
                h = h_cum * h_in[:, None] + h
                # dA_t * h_{t-1} = h_t - drive_t: the part of the state that came through the decay.
                g_decayed = g * (h - drive)
                g_B += g * B_n[None, :]
                g_decay += g_decayed * A_n[:, None]
                grad_A = _set_state_column(grad_A, offs_n, n,
                                           _state_column(grad_A, offs_n, n) + tl.sum(g_decayed * dt, axis=1))
                if HAS_Z:
                    out += h * C_n[None, :]
                tl.atomic_add(dB_ptr + bc_grad_seq + n * L + t, tl.sum(g * dtu, axis=0), mask=mask_t)
                tl.atomic_add(dC_ptr + bc_grad_seq + n * L + t, tl.sum(h * dout, axis=0), mask=mask_t)
        if not SUMMARY:
            grad_delta = tl.where(mask_et, (u * g_B + g_decay) * slope, 0.0)
            grad_bias += tl.sum(grad_delta, axis=1)
            grad_u = dt * g_B
            if HAS_D:
                grad_u += D[:, None] * dout
                grad_D += tl.sum(dout * u, axis=1)
            if HAS_Z:
                if HAS_D:
                    out += D[:, None] * u
                grad_z = dy * out * sig_z * (1.0 + z * (1.0 - sig_z))
                tl.store(dz_row + t[None, :] * sdz_l, grad_z.to(dz_ptr.dtype.element_ty), mask=mask_et)
            tl.store(du_row + t[None, :] * sdu_l, grad_u.to(du_ptr.dtype.element_ty), mask=mask_et)
            tl.store(dd_row + t[None, :] * sdd_l, grad_delta.to(ddelta_ptr.dtype.element_ty), mask=mask_et)

    if SUMMARY:
        seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + seg) * N + offs_n[None, :]
        tl.store(seg_decay_ptr + seg_offs, decay, mask=en_mask)
        tl.store(seg_grad_ptr + seg_offs, q, mask=en_mask)
    else:
        tl.atomic_add(dA_ptr + offs_e[:, None] * N + offs_n[None, :], grad_A, mask=en_mask)
        if HAS_D:
            tl.atomic_add(dD_ptr + offs_e, grad_D)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + offs_e, grad_bias)
        if STORE_DH0:
            if seg == 0:
                tl.store(dh0_ptr + state_offs, q, mask=en_mask)


@triton.jit
def _load_adjoint_frame(slot_index, first, k, L, u_row, d_row, dy_row, z_row, B_seq, C_seq, scratch, su_l, sd_l, sy_l,
                        sz_l, sB_l, sC_l, n_mask, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                        HAS_Z: tl.constexpr, REVERSE: tl.constexpr):
    """Inputs of the frame parked at ``slot_index`` of the scratch slot, which holds the part of chunk
    ``k`` from its frame ``first`` on, for the adjoint walk, its recomputed state included; nothing for a
    negative ``slot_index`` (a frame before the part)."""
    t = _frame_time(k * BLOCK_L + first + slot_index, L, REVERSE)
    in_slot = slot_index >= 0
    u, delta, B_t, C_t, z, dy = _load_frame(t, L, u_row, d_row, z_row, dy_row, B_seq, C_seq, su_l, sd_l, sz_l, sy_l,
                                            sB_l, sC_l, n_mask, in_slot, True, HAS_Z, True)
    h = tl.load(scratch + slot_index * (BLOCK_E * BLOCK_N), mask=in_slot, other=0.0)
    return u, delta, dy, B_t, C_t, z, h


@triton.jit
def _recompute_states(h, k, first, count, L, A2, bias, u_row, d_row, B_seq, su_l, sd_l, sB_l, n_mask, scratch,
                      park, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                      PREFETCH: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      REVERSE: tl.constexpr):
    """The states after frames ``[first, first + count)`` of chunk ``k`` (``count`` a multiple of ``UNROLL``
    or reaching the sequence's end), from the state ``h`` entering them; returns the last. Where ``park``,
    each state goes to the scratch slot, frame ``first`` at index 0. As in the forward kernel, frames are
    loaded ``PREFETCH`` ahead and ``UNROLL`` are unrolled per step; only ``u``, ``delta`` and ``B`` are read."""
    ahead = ()
    for p in tl.static_range(PREFETCH):
        ahead = ahead + (_load_frame(_frame_time(k * BLOCK_L + first + p, L, REVERSE), L, u_row, d_row, u_row, u_row,
                                     B_seq, B_seq, su_l, sd_l, su_l, su_l, sB_l, sB_l, n_mask, True,
                                     False, False, False)[:3],)
    for step in range(0, (count + UNROLL - 1) // UNROLL):
        for f in tl.static_range(UNROLL):
            i = first + step * UNROLL + f
            t = _frame_time(k * BLOCK_L + i, L, REVERSE)
            valid = (t >= 0) & (t < L)
            u, delta, B_t = ahead[0]
            ahead = ahead[1:] + (_load_frame(_frame_time(k * BLOCK_L + i + PREFETCH, L, REVERSE), L, u_row, d_row,
                                             u_row, u_row, B_seq, B_seq, su_l, sd_l, su_l, su_l, sB_l, sB_l, n_mask,
                                             True, False, False, False)[:3],)
            dt, _ = _dt(delta[:, None], bias, HAS_BIAS, SOFTPLUS, True)
            dt = tl.where(valid, dt, 0.0)
            h = tl.exp2(dt * A2) * h + (dt * u[:, None]) * B_t[None, :]
            tl.store(scratch + (i - first) * (BLOCK_E * BLOCK_N), h, mask=park)
    return h


@triton.jit
def _scan_bwd_sequential_summary_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, seg_decay_ptr, seg_grad_ptr,
    E, L, per_group, num_eblocks, chunks_per_seg, num_seg, out_scale,
    sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sy_b, sy_e, sy_l, sC_b, sC_g, sC_n, sC_l,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Adjoint summary of one channel block over one segment of time, for the segmented
    ``_scan_bwd_sequential_kernel``: the adjoint alone, walked against scan order through the segment
    from ``q = 0`` (``q <- (q + C_t dout_t) dA_t``), and the segment's total decay ``exp(A sum(dt))``.
    With them, ``q`` entering a segment's end from the later segments is ``decay q + q_summary`` per
    later segment, as in ``_scan_bwd_kernel``'s summaries. Frames are loaded ``PREFETCH`` ahead."""
    pid, pid_b, seg, offs_e, offs_n, n_mask, group = _channel_block(num_eblocks, per_group, N, BLOCK_E, BLOCK_N)
    en_mask = n_mask[None, :]
    bias = _channel_bias(bias_ptr, offs_e, HAS_BIAS, BLOCK_E)
    A2 = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=en_mask, other=0.0).to(tl.float32) * _LOG2E
    d_row = delta_ptr + pid_b * sd_b + offs_e * sd_e
    z_row = z_ptr + pid_b * sz_b + offs_e * sz_e
    dy_row = dy_ptr + pid_b * sy_b + offs_e * sy_e
    C_seq = C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n

    # The segment's frames in scan order: [first, end).
    first = seg * chunks_per_seg * BLOCK_L
    end = tl.minimum(first + chunks_per_seg * BLOCK_L, L)
    q = tl.zeros([BLOCK_E, BLOCK_N], tl.float32)
    dt_sum = tl.zeros([BLOCK_E, 1], tl.float32)
    # No u or B is needed: _load_frame reads delta and C in their place (the same addresses, cached).
    ahead = ()
    for p in tl.static_range(PREFETCH):
        ahead = ahead + (_load_frame(_frame_time(end - 1 - p, L, REVERSE), L, d_row, d_row, z_row, dy_row, C_seq,
                                     C_seq, sd_l, sd_l, sz_l, sy_l, sC_l, sC_l, n_mask, True, True, HAS_Z, True),)
    for r in range(0, end - first):
        _, delta, _, C_t, z, dy = ahead[0]
        ahead = ahead[1:] + (_load_frame(_frame_time(end - 1 - r - PREFETCH, L, REVERSE), L, d_row, d_row, z_row,
                                         dy_row, C_seq, C_seq, sd_l, sd_l, sz_l, sy_l, sC_l, sC_l, n_mask, True, True,
                                         HAS_Z, True),)
        dt, _ = _dt(delta[:, None], bias, HAS_BIAS, SOFTPLUS, True)
        dout = dy * out_scale
        if HAS_Z:
            dout = dout * z / (1.0 + tl.exp2(-z * _LOG2E))
        q = (q + dout[:, None] * C_t[None, :]) * tl.exp2(dt * A2)
        dt_sum += dt
    seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + seg) * N + offs_n[None, :]
    tl.store(seg_decay_ptr + seg_offs, tl.exp2(dt_sum * A2), mask=en_mask)
    tl.store(seg_grad_ptr + seg_offs, q, mask=en_mask)


@triton.jit
def _scan_bwd_sequential_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, dy_ptr, dlast_ptr, chunk_ptr, scratch_ptr,
    seg_decay_ptr, seg_grad_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_part_ptr, dC_part_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    E, L, per_group, num_eblocks, num_chunks, chunks_per_seg, num_seg, out_scale,
    su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sy_b, sy_e, sy_l,
    sdu_b, sdu_e, sdu_l, sdd_b, sdd_e, sdd_l, sdz_b, sdz_e, sdz_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    SCRATCH_L: tl.constexpr, PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Backward pass of one channel block over one segment of one sequence, one frame at a time.

    Chunks are visited against scan order, each in parts of ``SCRATCH_L``
    frames, also against scan order. For each part, the states are recomputed
    frame by frame from the state entering it and parked in this program's
    ``scratch`` slot (``SCRATCH_L`` tiles of ``BLOCK_E x BLOCK_N`` fp32, then
    ``BLOCK_L / SCRATCH_L`` tiles for the states entering the parts, which
    walks through the chunk find first); then the adjoint ``q`` (the gradient
    reaching the state after a frame through the next frame's decay) walks the
    part backwards with every per-frame gradient: no scan tree, no per-state
    loop. With 16 x 16 tiles, a whole 64-frame chunk takes 64 KiB per program,
    parts of 8 frames 16 KiB. The ``dB``/``dC`` shares of this channel block go
    to a per-block buffer (summed by the caller: deterministic, no atomics);
    ``dA``, ``dD`` and the dt bias gradient are summed in registers.

    Few long sequences (SepMamba) are split into segments of time: each
    segment starts from the ``q`` that the later segments' summaries
    (``_scan_bwd_sequential_summary_kernel``) give.
    """
    pid, pid_b, seg, offs_e, offs_n, n_mask, group = _channel_block(num_eblocks, per_group, N, BLOCK_E, BLOCK_N)
    en_mask = n_mask[None, :]

    bias = _channel_bias(bias_ptr, offs_e, HAS_BIAS, BLOCK_E)
    D = tl.zeros([BLOCK_E], tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_e).to(tl.float32)
    # Only A log2(e) is kept (the walks' exp2 argument; the gradient takes it times ln 2): holding A as
    # well, the compiler recomputed A log2(e) in every frame to spare registers.
    A2 = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=en_mask, other=0.0).to(tl.float32) * _LOG2E

    u_row = u_ptr + pid_b * su_b + offs_e * su_e
    d_row = delta_ptr + pid_b * sd_b + offs_e * sd_e
    z_row = z_ptr + pid_b * sz_b + offs_e * sz_e
    dy_row = dy_ptr + pid_b * sy_b + offs_e * sy_e
    du_row = du_ptr + pid_b * sdu_b + offs_e * sdu_e
    dd_row = ddelta_ptr + pid_b * sdd_b + offs_e * sdd_e
    dz_row = dz_ptr + pid_b * sdz_b + offs_e * sdz_e
    B_seq = B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n
    C_seq = C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n
    # dB/dC shares: (batch, num_eblocks, L, N) fp32.
    part_seq = (pid * L) * N + offs_n
    state_offs = (pid_b * E + offs_e[:, None]) * N + offs_n[None, :]
    tile_offs = tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + offs_n[None, :]
    # This program's scratch slot (allocated by _backward): SCRATCH_L states, then the states entering
    # each part of a chunk.
    slot_tiles: tl.constexpr = SCRATCH_L + BLOCK_L // SCRATCH_L
    scratch = scratch_ptr + (seg * tl.num_programs(0) + pid) * (slot_tiles * BLOCK_E * BLOCK_N) + tile_offs
    k_begin = seg * chunks_per_seg
    k_end = tl.minimum(k_begin + chunks_per_seg, num_chunks)

    q = tl.zeros([BLOCK_E, BLOCK_N], tl.float32)
    if HAS_DLAST:
        q = tl.load(dlast_ptr + state_offs, mask=en_mask, other=0.0).to(tl.float32)
    # Later segments (in scan order) pass their adjoint back to this one.
    for i in range(0, num_seg - 1 - seg):
        seg_offs = ((pid_b * E + offs_e[:, None]) * num_seg + num_seg - 1 - i) * N + offs_n[None, :]
        q = tl.load(seg_decay_ptr + seg_offs, mask=en_mask, other=1.0) * q + tl.load(
            seg_grad_ptr + seg_offs, mask=en_mask, other=0.0)
    grad_A = tl.zeros([BLOCK_E, BLOCK_N], tl.float32)
    grad_D = tl.zeros([BLOCK_E], tl.float32)
    grad_bias = tl.zeros([BLOCK_E], tl.float32)
    tile = BLOCK_E * BLOCK_N
    for j in range(0, k_end - k_begin):
        k = k_end - 1 - j
        h = _chunk_entering_state(chunk_ptr, h0_ptr, pid_b * E + offs_e[:, None], k, num_chunks, offs_n[None, :],
                                  en_mask, N, HAS_H0)
        # The chunk is taken in parts of SCRATCH_L frames against scan order, so that the scratch slot
        # holds SCRATCH_L frames' states, not BLOCK_L. Its walks: parts - 1 that leave the state entering
        # each later part in the slot's boundary tiles, then, per part against scan order, one that parks
        # the part's states and the adjoint walk back through them. One loop runs both kinds (the first
        # parks nothing and walks no adjoint frames): one inlined copy of the unrolled recomputing walk
        # compiles faster than two (2.2-2.4 against 3.1-4.2 s for sm_90, compiled on the CPU).
        frames = tl.minimum(L - k * BLOCK_L, BLOCK_L)
        parts = (frames + SCRATCH_L - 1) // SCRATCH_L
        tl.store(scratch + SCRATCH_L * tile, h)
        for walk in range(0, 2 * parts - 1):
            finding = walk < parts - 1
            part = tl.where(finding, walk, 2 * parts - 2 - walk)
            first = part * SCRATCH_L
            count = tl.minimum(frames - first, SCRATCH_L)
            tl.debug_barrier()  # the boundary tiles and the previous part's states were written by these threads
            h = tl.where(finding, h, tl.load(scratch + (SCRATCH_L + part) * tile, mask=not finding, other=0.0))
            h = _recompute_states(h, k, first, count, L, A2, bias, u_row, d_row, B_seq, su_l, sd_l, sB_l, n_mask,
                                  scratch, not finding, BLOCK_E, BLOCK_N, BLOCK_L, PREFETCH, UNROLL, HAS_BIAS,
                                  SOFTPLUS, REVERSE)
            # (For the last part, the tile after the slot: never written, as only finding walks store.)
            tl.store(scratch + (SCRATCH_L + part + 1) * tile, h, mask=finding)
            tl.debug_barrier()
            # The adjoint walk is not unrolled (unrolled, the kernel takes minutes to compile); it starts at
            # the part's last frame inside the sequence.
            adjoint_frames = tl.where(finding, 0, count)
            ahead = ()
            for p in tl.static_range(_ADJOINT_PREFETCH):
                ahead = ahead + (_load_adjoint_frame(adjoint_frames - 1 - p, first, k, L, u_row, d_row, dy_row, z_row,
                                                     B_seq, C_seq, scratch, su_l, sd_l, sy_l, sz_l, sB_l, sC_l, n_mask,
                                                     BLOCK_E, BLOCK_N, BLOCK_L, HAS_Z, REVERSE),)
            for r in range(0, adjoint_frames):
                slot_index = adjoint_frames - 1 - r
                t = _frame_time(k * BLOCK_L + first + slot_index, L, REVERSE)
                valid = (t >= 0) & (t < L)
                u, delta, dy, B_t, C_t, z, h = ahead[0]
                ahead = ahead[1:] + (_load_adjoint_frame(slot_index - _ADJOINT_PREFETCH, first, k, L, u_row, d_row,
                                                         dy_row, z_row, B_seq, C_seq, scratch, su_l, sd_l, sy_l, sz_l,
                                                         sB_l, sC_l, n_mask, BLOCK_E, BLOCK_N, BLOCK_L, HAS_Z,
                                                         REVERSE),)
                dy = dy * out_scale
                dt, slope = _dt(delta[:, None], bias, HAS_BIAS, SOFTPLUS, True)  # (BLOCK_E, 1)
                dt = tl.where(valid, dt, 0.0)
                dt_e, slope_e = tl.sum(dt, axis=1), tl.sum(slope, axis=1)  # the same as (BLOCK_E,) vectors
                if HAS_Z:
                    sig_z = 1.0 / (1.0 + tl.exp2(-z * _LOG2E))
                    dout = dy * z * sig_z
                else:
                    dout = dy
                dtu = dt * u[:, None]  # (BLOCK_E, 1)
                drive = dtu * B_t[None, :]
                g = q + dout[:, None] * C_t[None, :]
                # dA_t * h_{t-1} = h_t - drive_t: the part of the state that came through the decay.
                g_decayed = g * (h - drive)
                g_B = tl.sum(g * B_t[None, :], axis=1)
                g_decay = tl.sum(g_decayed * A2, axis=1) * _LN2
                grad_A += g_decayed * dt
                grad_delta = tl.where(valid, (u * g_B + g_decay) * slope_e, 0.0)
                grad_bias += grad_delta
                grad_u = dt_e * g_B + D * dout
                grad_D += dout * u
                if HAS_Z:
                    out = tl.sum(h * C_t[None, :], axis=1) + D * u
                    grad_z = dy * out * sig_z * (1.0 + z * (1.0 - sig_z))
                    tl.store(dz_row + t * sdz_l, grad_z.to(dz_ptr.dtype.element_ty), mask=valid)
                tl.store(du_row + t * sdu_l, grad_u.to(du_ptr.dtype.element_ty), mask=valid)
                tl.store(dd_row + t * sdd_l, grad_delta.to(ddelta_ptr.dtype.element_ty), mask=valid)
                tl.store(dB_part_ptr + part_seq + t * N, tl.sum(g * dtu, axis=0), mask=n_mask & valid)
                tl.store(dC_part_ptr + part_seq + t * N, tl.sum(h * dout[:, None], axis=0), mask=n_mask & valid)
                q = g * tl.exp2(dt * A2)
        tl.debug_barrier()  # the next chunk overwrites the slot

    tl.atomic_add(dA_ptr + offs_e[:, None] * N + offs_n[None, :], grad_A, mask=en_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_e, grad_D)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_e, grad_bias)
    if STORE_DH0:
        if seg == 0:
            tl.store(dh0_ptr + state_offs, q, mask=en_mask)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is at most ``cap``."""
    return min(n & -n, cap)


def _sequential_block_e(batch: int, channels: int, per_group: int, config: ScanConfig) -> int:
    """Channels per program of the frame-by-frame kernels."""
    block_e = config.sequential_block_e
    if batch * channels < config.sequential_wide_min_rows:
        block_e = max(1, block_e // 2)
    return _pow2_divisor(per_group, block_e)


@dataclass(frozen=True)
class _Launch:
    block_e: int
    block_l: int
    block_n: int
    num_warps: int
    num_eblocks: int
    num_chunks: int
    chunks_per_seg: int
    num_seg: int


# Launch shapes are cached per (shapes, config): short inputs are bound by the host's time per call.
@functools.lru_cache(maxsize=4096)
def _plan(batch: int, channels: int, length: int, state: int, per_group: int, config: ScanConfig) -> _Launch:
    block_e = _pow2_divisor(per_group, config.block_e)
    # Fewest padded frames, counting each chunk's fixed cost as 16 frames (129 frames: 3 chunks of 64,
    # not 2 of 128); ties go to the longer chunk.
    sizes = [2**i for i in range(4, config.block_l.bit_length()) if 2**i <= config.block_l] or [config.block_l]
    block_l = min(reversed(sizes), key=lambda size: cdiv(length, size) * (size + 16))
    num_eblocks = channels // block_e
    num_chunks = cdiv(length, block_l)
    chunks_per_seg, num_seg = _segments(batch * num_eblocks, num_chunks, config.min_programs,
                                        config.min_segment_chunks)
    return _Launch(block_e, block_l, next_power_of_2(state), config.num_warps, num_eblocks, num_chunks,
                   chunks_per_seg, num_seg)


@functools.lru_cache(maxsize=4096)
def _backward_plan(batch: int, channels: int, length: int, state: int, per_group: int, block_l: int,
                   config: ScanConfig) -> _Launch:
    """``_plan`` at the forward pass's chunk size ``block_l`` (the chunk-entering states were stored at it)."""
    return _plan(batch, channels, length, state, per_group, replace(config, block_l=block_l))


def _segments(programs: int, num_chunks: int, min_programs: int, min_segment_chunks: int) -> Tuple[int, int]:
    """(chunks per segment, segments): time split until about ``min_programs`` programs run."""
    num_seg = 1
    if min_programs and programs < min_programs:
        wanted = cdiv(min_programs, programs)
        num_seg = max(1, min(wanted, num_chunks // max(1, min_segment_chunks)))
    chunks_per_seg = cdiv(num_chunks, num_seg)
    return chunks_per_seg, cdiv(num_chunks, chunks_per_seg)


@dataclass(frozen=True)
class _ForwardLaunch:
    """Which forward kernel runs, on which grid, with which tile constants."""

    plan: _Launch
    sequential: bool
    grid: Tuple[int, int]
    num_eblocks: int
    chunks_per_seg: int
    num_seg: int
    constants: Mapping[str, int] = field(hash=False)  # read-only: the object is shared through a cache


@functools.lru_cache(maxsize=4096)
def _forward_launch(batch: int, channels: int, length: int, state: int, groups: int,
                    config: ScanConfig) -> _ForwardLaunch:
    """The forward kernel, grid and tile constants for a scan of these shapes under ``config``: the
    frame-by-frame kernel with enough rows, in chunks of ``sequential_block_l`` (split in time when
    ``sequential_split_programs`` asks, in the chunks the chunked backward kernel reads), else the
    chunked one."""
    per_group = channels // groups
    enough_rows = bool(config.sequential_min_rows) and batch * channels >= config.sequential_min_rows
    if enough_rows:
        config = replace(config, block_l=config.sequential_block_l)
    plan = _plan(batch, channels, length, state, per_group, config)
    if enough_rows or config.sequential_split_programs:
        block_e = _sequential_block_e(batch, channels, per_group, config)
        programs = batch * (channels // block_e)
        chunks_per_seg, num_seg = (plan.num_chunks, 1) if enough_rows else _segments(
            programs, plan.num_chunks, config.sequential_split_programs, config.min_segment_chunks)
        constants = MappingProxyType(dict(
            BLOCK_N=plan.block_n, BLOCK_L=plan.block_l, BLOCK_E=block_e, PREFETCH=config.sequential_prefetch,
            UNROLL=min(config.sequential_unroll, plan.block_l), num_warps=1))
        return _ForwardLaunch(plan, True, (programs, num_seg), channels // block_e, chunks_per_seg, num_seg,
                              constants)
    constants = MappingProxyType(dict(BLOCK_N=plan.block_n, BLOCK_L=plan.block_l, BLOCK_E=plan.block_e,
                                      num_warps=plan.num_warps))
    return _ForwardLaunch(plan, False, (batch * plan.num_eblocks, plan.num_seg), plan.num_eblocks,
                          plan.chunks_per_seg, plan.num_seg, constants)


def _strides3(t: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[int, int, int]:
    return tuple((t if t is not None else like).stride())


def _empty_in_layout(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty (batch, channels, length) tensor, channels innermost if ``like``'s are.

    The Mamba mixer passes channel-last views (time frames of a projection); outputs and
    gradients in the same layout are read and written in whole frames, and the
    next projection needs no transposing copy.
    """
    batch, channels, length = like.shape
    options = dict(dtype=dtype or like.dtype, device=like.device)
    if like.stride(1) == 1 and channels > 1:
        return torch.empty(batch, length, channels, **options).transpose(1, 2)
    return torch.empty(batch, channels, length, **options)


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, reverse, output_scale, output_add,
             store_chunks, config):
    """Runs the forward kernels; returns (y, last state, chunk-entering states or None, plan)."""
    batch, channels, length = u.shape
    state = A.shape[1]
    launch = _forward_launch(batch, channels, length, state, B.shape[1], config)
    f32 = dict(dtype=torch.float32, device=u.device)
    y = _empty_in_layout(u)
    last = torch.empty(batch, channels, state, **f32)
    # Buffers a launch does not touch are passed as ``last`` (no allocation).
    chunks = torch.empty(batch, channels, launch.plan.num_chunks - 1, state, **f32) if store_chunks else None
    if launch.num_seg > 1:
        seg_decay = torch.empty(batch, channels, launch.num_seg, state, **f32)
        seg_state = torch.empty_like(seg_decay)
    else:
        seg_decay = seg_state = last
    args = [
        u, delta, A.contiguous(), B, C,
        u if D is None else D.contiguous(), u if z is None else z,
        u if delta_bias is None else delta_bias.contiguous(),
        u if initial_state is None else initial_state.contiguous(),
        u if output_add is None else output_add,
        y, last, last if chunks is None or chunks.numel() == 0 else chunks, seg_decay, seg_state,
        channels, length, channels // B.shape[1], launch.num_eblocks, launch.plan.num_chunks,
        launch.chunks_per_seg, launch.num_seg, output_scale,
        *u.stride(), *delta.stride(), *_strides3(z, u), *_strides3(output_add, u), *y.stride(),
        *B.stride(), *C.stride(),
    ]
    kernel = _scan_fwd_sequential_kernel if launch.sequential else _scan_fwd_kernel
    flags = dict(
        N=state, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, HAS_ADD=output_add is not None, SOFTPLUS=softplus, REVERSE=reverse,
        **launch.constants,
    )
    if launch.num_seg > 1:
        kernel[launch.grid](*args, SUMMARY=True, STORE_CHUNKS=False, **flags)
    kernel[launch.grid](*args, SUMMARY=False, STORE_CHUNKS=store_chunks, **flags)
    return y, last, chunks, launch.plan


def _backward(u, delta, A, B, C, D, z, delta_bias, initial_state, dy, dlast, chunks, fwd_plan, softplus, reverse,
              output_scale, want_dh0, config):
    batch, channels, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    # The chunk-entering states were stored at the forward pass's chunk size.
    plan = _backward_plan(batch, channels, length, state, channels // groups, fwd_plan.block_l, config)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = _empty_in_layout(u), _empty_in_layout(delta)
    dz = None if z is None else _empty_in_layout(z)
    dA = torch.zeros(channels, state, **f32)
    dD = None if D is None else torch.zeros(channels, **f32)
    dbias = None if delta_bias is None else torch.zeros(channels, **f32)
    dh0 = torch.empty(batch, channels, state, **f32) if want_dh0 else None
    A, z_arg = A.contiguous(), u if z is None else z
    bias_arg = u if delta_bias is None else delta_bias.contiguous()
    inputs = [u, delta, A, B, C, u if D is None else D.contiguous(), z_arg, bias_arg,
              u if initial_state is None else initial_state.contiguous(), dy,
              u if dlast is None else dlast.contiguous(), chunks if chunks.numel() else dA]
    strides = [*u.stride(), *delta.stride(), *_strides3(z, u), *dy.stride(), *du.stride(), *ddelta.stride(),
               *_strides3(dz, du), *B.stride(), *C.stride()]
    flags = dict(
        N=state, BLOCK_N=plan.block_n, BLOCK_L=plan.block_l,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, HAS_DLAST=dlast is not None, SOFTPLUS=softplus, REVERSE=reverse,
        STORE_DH0=want_dh0,
    )
    per_group = channels // groups
    sequential_block_e = _sequential_block_e(batch, channels, per_group, config)
    num_eblocks = channels // sequential_block_e
    enough_rows = bool(config.sequential_min_rows) and batch * channels >= config.sequential_min_rows
    if enough_rows or config.sequential_split_programs:
        programs = batch * num_eblocks
        chunks_per_seg, num_seg = (plan.num_chunks, 1) if enough_rows else _segments(
            programs, plan.num_chunks, config.sequential_split_programs, config.min_segment_chunks)
        # Per program: the states of scratch_l frames and those entering each part of a chunk (the
        # kernel's slot_tiles).
        scratch_l = min(config.sequential_scratch_l, plan.block_l)
        slot_tiles = scratch_l + plan.block_l // scratch_l
        scratch = torch.empty(num_seg * programs, slot_tiles * sequential_block_e * plan.block_n, **f32)
        # Each channel block's share of dB and dC, frames in order; summed over the group's blocks below.
        dB_part = torch.empty(batch, num_eblocks, length, state, **f32)
        dC_part = torch.empty_like(dB_part)
        seg_decay = seg_grad = dA  # not read without segments
        if num_seg > 1:
            seg_decay = torch.empty(batch, channels, num_seg, state, **f32)
            seg_grad = torch.empty_like(seg_decay)
            _scan_bwd_sequential_summary_kernel[(programs, num_seg)](
                delta, A, C, z_arg, bias_arg, dy, seg_decay, seg_grad,
                channels, length, per_group, num_eblocks, chunks_per_seg, num_seg, output_scale,
                *delta.stride(), *_strides3(z, u), *dy.stride(), *C.stride(),
                N=state, BLOCK_N=plan.block_n, BLOCK_E=sequential_block_e, BLOCK_L=plan.block_l,
                PREFETCH=config.sequential_prefetch, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=softplus, REVERSE=reverse, num_warps=1,
            )
        _scan_bwd_sequential_kernel[(programs, num_seg)](
            *inputs, scratch, seg_decay, seg_grad, du, ddelta, dA, dB_part, dC_part, dA if dD is None else dD,
            du if dz is None else dz, dA if dbias is None else dbias, dA if dh0 is None else dh0,
            channels, length, per_group, num_eblocks, plan.num_chunks, chunks_per_seg, num_seg, output_scale,
            *strides, BLOCK_E=sequential_block_e, SCRATCH_L=scratch_l, PREFETCH=config.sequential_prefetch,
            UNROLL=min(config.sequential_unroll, scratch_l), num_warps=config.sequential_num_warps, **flags,
        )

        def group_sum(part: torch.Tensor) -> torch.Tensor:  # -> (batch, groups, N, L)
            return part.view(batch, groups, num_eblocks // groups, length, state).sum(2).transpose(2, 3)

        return du, ddelta, dA, group_sum(dB_part), group_sum(dC_part), dD, dz, dbias, dh0
    dB = torch.zeros(batch, groups, state, length, **f32)
    dC = torch.zeros_like(dB)
    seg_decay = torch.empty(batch, channels, plan.num_seg, state, **f32)
    seg_grad = torch.empty_like(seg_decay)
    args = [
        *inputs, seg_decay, seg_grad,
        du, ddelta, dA, dB, dC, dA if dD is None else dD, du if dz is None else dz,
        dA if dbias is None else dbias, dA if dh0 is None else dh0,
        channels, length, per_group, groups, plan.num_eblocks, plan.num_chunks, plan.chunks_per_seg,
        plan.num_seg, output_scale, *strides,
    ]
    flags.update(BLOCK_E=plan.block_e, num_warps=plan.num_warps)
    grid = (batch * plan.num_eblocks, plan.num_seg)
    if plan.num_seg > 1:
        _scan_bwd_kernel[grid](*args, SUMMARY=True, **flags)
    _scan_bwd_kernel[grid](*args, SUMMARY=False, **flags)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0


class _TritonScan(torch.autograd.Function):
    """Autograd wrapper: the forward keeps the chunk-entering states, the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, output_add, softplus, reverse,
                output_scale, fwd_config, bwd_config):
        ctx.set_materialize_grads(False)
        store = any(ctx.needs_input_grad[:9])
        y, last, chunks, plan = _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, reverse,
                                         output_scale, output_add, store, fwd_config)
        if store:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, chunks)
            ctx.plan, ctx.softplus, ctx.reverse, ctx.bwd_config = plan, softplus, reverse, bwd_config
            ctx.output_scale = output_scale
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        # y = output_scale * scan + output_add: the added tensor's gradient is dy itself.
        d_add = dy if ctx.needs_input_grad[9] else None
        if not any(ctx.needs_input_grad[:9]):
            return (None,) * 9 + (d_add,) + (None,) * 5
        u, delta, A, B, C, D, z, delta_bias, initial_state, chunks = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        want_dh0 = ctx.needs_input_grad[8]
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _backward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, dy, dlast, chunks, ctx.plan, ctx.softplus, ctx.reverse,
            ctx.output_scale, want_dh0, ctx.bwd_config,
        )
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        return (
            du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), cast(dD, D), dz, cast(dbias, delta_bias),
            None if dh0 is None else dh0.to(initial_state.dtype), d_add, None, None, None, None, None,
        )


def selective_scan_triton(
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
    output_scale: float = 1.0,
    output_add: Optional[torch.Tensor] = None,
    forward_config: Optional[ScanConfig] = None,
    backward_config: Optional[ScanConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`speechbrain_mamba.ops.selective_scan`.

    Arguments are those of ``selective_scan`` with ``B`` and ``C`` shaped
    ``(batch, groups, N, L)``; any strides are read as they are. Every input
    gets its gradient, ``initial_state``, ``output_add`` and the last state
    included. The output's scale and addition happen in the kernel's last step.

    Arguments
    ---------
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, output_scale, output_add
        As in ``selective_scan``.
    forward_config, backward_config : ScanConfig, optional
        Tile sizes (defaults: ``FORWARD_CONFIG_FP32`` for fp32 inputs, else
        ``FORWARD_CONFIG``; ``BACKWARD_CONFIG``).

    Returns
    -------
    (y, last_state): ``y`` in ``u``'s dtype, ``last_state`` in fp32.
    """
    if not u.is_cuda and not interpreting():
        raise ValueError(f"backend='triton' runs on CUDA tensors only; u is on {u.device}.")
    check_32bit_offsets(u=u, delta=delta, z=z, B=B, C=C, output_add=output_add)
    forward_config = forward_config or (FORWARD_CONFIG_FP32 if u.element_size() == 4 else FORWARD_CONFIG)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state, output_add)
    if not needs_autograd(*inputs):
        y, last, _, _ = _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                 bool(reverse), float(output_scale), output_add, False, forward_config)
        return y, last
    return _TritonScan.apply(
        *inputs, bool(delta_softplus), bool(reverse), float(output_scale), forward_config,
        backward_config or BACKWARD_CONFIG,
    )


__all__ = ["BACKWARD_CONFIG", "FORWARD_CONFIG", "FORWARD_CONFIG_FP32", "ScanConfig", "selective_scan_triton"]
