"""Tile sweep of the frame-by-frame forward scan kernel on DPMamba-M's intra/inter shapes (GPU).

Launches ``_scan_fwd_sequential_kernel`` directly with channels per program
(BLOCK_E), warps per program and frames per chunk (BLOCK_L; the prefetch
distance and the frames unrolled per step are ``FORWARD_CONFIG``'s), on
channel-last views as the Mamba mixer passes them, and prints the time
(``triton.testing.do_bench``, median), registers per thread, spills, and the
largest difference from the default tile's output. ``--store-chunks`` also
stores the chunk-entering states, as in training; without it, as in inference.
Usage::

    python benchmarks/sweep_scan_forward.py [--store-chunks]   # one line per (shape, dtype, tile)
"""
import argparse
import time

import torch
import triton

from speechbrain_mamba.ops import scan_triton as st

SHAPES = {"intra-4s": (33, 512, 250), "inter-4s": (250, 512, 33), "intra-16s": (129, 512, 250),
          "inter-16s": (250, 512, 129), "intra-60s": (481, 512, 250), "inter-60s": (250, 512, 481)}


def inputs(batch, channels, length, dtype):
    """Views of the mixer's projections, as it passes them: u and z halves of one, B and C slices of another."""
    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, length, 2 * channels, device="cuda", generator=g, dtype=dtype)
    u, z = xz[..., :channels].transpose(1, 2), xz[..., channels:].transpose(1, 2)
    delta = (0.5 * torch.randn(batch, length, channels, device="cuda", generator=g, dtype=dtype)).transpose(1, 2)
    proj = torch.randn(batch, length, 48, device="cuda", generator=g, dtype=dtype)
    B, C = proj[..., 16:32].transpose(1, 2).unsqueeze(1), proj[..., 32:].transpose(1, 2).unsqueeze(1)
    A = -torch.rand(channels, 16, device="cuda") - 0.5
    D, bias = torch.randn(channels, device="cuda"), torch.randn(channels, device="cuda") * 0.1
    return u, delta, A, B, C, D, z, bias


def launch(args, block_e, warps, block_l, store):
    u, delta, A, B, C, D, z, bias = args
    batch, channels, length = u.shape
    num_chunks = triton.cdiv(length, block_l)
    y = st._empty_in_layout(u)
    last = torch.empty(batch, channels, 16, device="cuda")
    chunks = torch.empty(batch, channels, num_chunks if store else 0, 16, device="cuda")
    strides = [*u.stride(), *delta.stride(), *z.stride(), *y.stride(), *y.stride(), *B.stride(), *C.stride()]
    no_segments = torch.empty(0, device="cuda")  # one segment: no summaries
    config = st.FORWARD_CONFIG
    k = st._scan_fwd_sequential_kernel[(batch * (channels // block_e), 1)](
        u, delta, A, B, C, D, z, bias, u, u, y, last, chunks, no_segments, no_segments, channels, length, channels,
        channels // block_e, num_chunks, num_chunks, 1, 1.0, *strides, N=16, BLOCK_N=16, BLOCK_E=block_e,
        BLOCK_L=block_l, PREFETCH=config.sequential_prefetch, UNROLL=min(config.sequential_unroll, block_l),
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_H0=False, HAS_ADD=False, SOFTPLUS=True, REVERSE=False,
        SUMMARY=False, STORE_CHUNKS=store, num_warps=warps)
    return y, k


parser = argparse.ArgumentParser(description="Tile sweep of the frame-by-frame forward scan kernel.")
parser.add_argument("--store-chunks", action="store_true", help="store the chunk-entering states (training)")
store = parser.parse_args().store_chunks
configs = [(16, 1, 32), (16, 2, 32), (32, 1, 32), (32, 2, 32), (64, 2, 32), (64, 4, 32)]
for dtype in (torch.float32, torch.bfloat16):
    for name, shape in SHAPES.items():
        args = inputs(*shape, dtype)
        ref, _ = launch(args, 16, 1, 32, False)
        for block_e, warps, block_l in configs:
            t0 = time.time()
            y, k = launch(args, block_e, warps, block_l, store)
            compile_s = time.time() - t0
            err = (y.float() - ref.float()).abs().max().item()
            ms = triton.testing.do_bench(lambda: launch(args, block_e, warps, block_l, store), warmup=5, rep=50)
            print(f"{name} {str(dtype)[6:]} e{block_e} w{warps} l{block_l}: {ms:.3f} ms regs={k.n_regs} "
                  f"spills={k.n_spills} maxdiff={err:.1e} (compile+first {compile_s:.0f} s)", flush=True)
