"""CPU experiment: does cutting time into segments speed up the PyTorch inference scan on few long sequences?

SepMamba's stages scan one sequence of 10-40 thousand frames (batch 1), so each
frame step of ``_selective_scan_inference`` (one ``addcmul_``) covers only
``channels x N`` values (4096 at the first stage) and might be bound by the
cost of launching a PyTorch op rather than by arithmetic. The alternative
measured here cuts time into ``K`` segments scanned side by side as ``K``
sequences, in two passes: one for each segment's end state from a zero state,
then, after carrying the states across segments (``K`` small steps), the full
scan of every segment from its entering state. It does about 1.8x the
arithmetic in ``K`` times fewer, larger ops. Both run in one process,
interleaved in rounds (this machine's speed drifts), with glibc keeping freed
memory as the recipes do; the outputs are compared first.

Usage: python benchmarks/cpu_scan_segments.py [--threads 2] [--rounds 3] [--segments 16,32]
"""

import argparse
import math
import time
from typing import Callable, Dict, List

import torch

from bench_utils import machine_description, median
from speechbrain_mamba.ops.scan_torch import _selective_scan_inference, _softplus_exp2
from speechbrain_mamba.utils.cpu import keep_freed_memory

# SepMamba-M's three resolutions on a 10 s mixture at 8 kHz: (batch, d_inner, length), d_state 16.
SHAPES = {"stage 1": (1, 256, 40000), "stage 2": (1, 512, 20000), "stage 3": (1, 1024, 10000)}
STATE_SIZE = 16


def make_inputs(batch: int, channels: int, length: int) -> tuple:
    """The arguments of ``_selective_scan_inference`` as a Mamba mixer passes them (channel-last views).

    Step sizes are small enough (softplus of about -4) that states last for hundreds of frames, so that the
    state carried across segments matters in the comparison of outputs.
    """
    g = torch.Generator().manual_seed(0)
    channel_last = lambda width: torch.randn(batch, length, width, generator=g).transpose(1, 2)  # noqa: E731
    u, z = channel_last(channels), channel_last(channels)
    delta = channel_last(channels) * 0.5 - 4.0
    A = -torch.rand(channels, STATE_SIZE, generator=g) - 0.1
    B, C = channel_last(STATE_SIZE).unsqueeze(1), channel_last(STATE_SIZE).unsqueeze(1)
    D, bias = torch.ones(channels), torch.zeros(channels)
    return u, delta, A, B, C, D, z, bias, True, None, False, 1.0, None


def segmented_scan(u, delta, A, B, C, D, z, bias, softplus, initial, reverse, scale, add, segments: int):
    """``_selective_scan_inference`` with time cut into ``segments`` segments scanned as sequences (two passes)."""
    batch, channels, length = u.shape
    seg_len = -(-length // segments)
    pad = segments * seg_len - length
    dt = delta.transpose(1, 2).float() + bias
    dt = _softplus_exp2(dt) if softplus else dt

    def as_segments(x: torch.Tensor) -> torch.Tensor:
        """(batch, L, width) -> (batch * segments, width, seg_len), padded frames have dt = 0 (no change)."""
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(batch * segments, seg_len, x.shape[-1]).transpose(1, 2)

    dt_s, u_s = as_segments(dt), as_segments(u.transpose(1, 2))
    groups = B.shape[1]
    B_s = as_segments(B.flatten(1, 2).transpose(1, 2)).unflatten(1, (groups, -1))
    C_s = as_segments(C.flatten(1, 2).transpose(1, 2)).unflatten(1, (groups, -1))
    z_s = as_segments(z.transpose(1, 2))
    _, end_state = _selective_scan_inference(u_s, dt_s, A, B_s, C_s, None, None, None, False, None, reverse, 1.0, None)
    end_state = end_state.view(batch, segments, channels, -1)
    total_decay = torch.exp2(dt_s.sum(-1).view(batch, segments, channels, 1) * A * math.log2(math.e))
    entering = torch.empty_like(end_state)
    carry = torch.zeros_like(end_state[:, 0]) if initial is None else initial.float()
    for k in reversed(range(segments)) if reverse else range(segments):
        entering[:, k] = carry
        carry = total_decay[:, k] * carry + end_state[:, k]
    y, _ = _selective_scan_inference(u_s, dt_s, A, B_s, C_s, D, z_s, None, False,
                                     entering.view(batch * segments, channels, -1), reverse, 1.0, None)
    y = y.transpose(1, 2).reshape(batch, segments * seg_len, channels)[:, :length]
    return y.transpose(1, 2) * scale + (0 if add is None else add), carry


def time_ms(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segments", default="16,32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"# {machine_description(args.threads)}; glibc keeps freed memory; median of {args.rounds} interleaved "
          "rounds, ms")
    segment_counts = [int(k) for k in args.segments.split(",")]
    print("| shape (batch, d_inner, L) | frame by frame | " + " | ".join(f"{k} segments" for k in segment_counts)
          + " | max abs difference of y (scale of y) |")
    print("|---|---|" + "---|" * len(segment_counts) + "---|")
    for name, shape in SHAPES.items():
        inputs = make_inputs(*shape)
        variants: Dict[str, Callable[[], object]] = {"base": lambda: _selective_scan_inference(*inputs)}
        for k in segment_counts:
            variants[k] = lambda k=k: segmented_scan(*inputs, segments=k)
        reference, _ = variants["base"]()
        difference = max((variants[k]()[0] - reference).abs().max().item() for k in segment_counts)
        times: Dict[object, List[float]] = {key: [] for key in variants}
        for _ in range(args.rounds):
            for key, run in variants.items():
                times[key].append(time_ms(run))
        cells = [f"{median(times[key]):.0f}" for key in variants]
        print(f"| {name} {shape} | " + " | ".join(cells) + f" | {difference:.1e} ({reference.abs().max():.0f}) |",
              flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
