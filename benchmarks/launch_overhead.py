"""Host time per call of the package's Triton ops and of bare Triton launches (GPU).

Eager DPMamba is bound by the host on short inputs and in training; this says what one call costs the host.
Calls are issued back to back and synchronised at the end of each of 5 rounds of 2000; the least round is
reported per call. Rows: the scan's public call on DPMamba-M's 4 s intra-chunk shape (inference, one
launch), the causal convolution, RMSNorm, a kernel with an empty body and 10 or 61 arguments (through
Triton's JIT launcher, and through the compiled kernel's own launcher, which skips the JIT's argument
specialisation), a PyTorch op for reference, and the scan's Python wrapper with its launch replaced by a
no-op. Then forward + backward of the scan, the convolution and RMSNorm (``torch.autograd.grad`` of every
input): host and GPU time per call, whether a call synchronises with the GPU, and the scan's host cost
with its kernels' launches replaced by no-ops; ``--cprofile`` adds Python profiles of those calls.

Usage: ``python benchmarks/launch_overhead.py [--cprofile]``
"""

import pstats
import sys
import time
from typing import Callable

import torch
import triton
import triton.language as tl

import speechbrain_mamba.ops.scan_triton as scan_triton
from bench_utils import cprofile_calls, machine_description
from profile_model import kernel_ms_per_call
from speechbrain_mamba.ops import causal_conv1d_silu, rms_norm, selective_scan


@triton.jit
def _ten_arguments(p0, a1, a2, a3, a4, a5, a6, a7, a8, a9, N: tl.constexpr):
    pass


@triton.jit
def _sixty_one_arguments(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14,
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
    a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34,
    N: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr, B5: tl.constexpr,
    B6: tl.constexpr, B7: tl.constexpr, B8: tl.constexpr, B9: tl.constexpr, B10: tl.constexpr,
):
    pass


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us(call: Callable[[], object], calls: int = 2000, rounds: int = 5) -> float:
    """Least host microseconds per call over ``rounds`` rounds of ``calls`` back-to-back calls."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main() -> None:
    device = torch.device("cuda")
    print("#", machine_description(device=device))
    batch, channels, state, length = 34, 512, 16, 250  # DPMamba-M, 4 s, intra-chunk sequences
    xz = torch.randn(batch, length, 2 * channels, device=device)
    x, z = xz[..., :channels], xz[..., channels:]
    projections = torch.randn(batch, length, 16 + 2 * state, device=device)
    B, C = (projections[..., 16 + i * state: 16 + (i + 1) * state].transpose(1, 2) for i in range(2))
    delta = torch.randn(batch, length, channels, device=device).transpose(1, 2)
    A = -torch.rand(channels, state, device=device)
    D, dt_bias, conv_bias = (torch.rand(channels, device=device) for _ in range(3))
    conv_weight = torch.randn(channels, 4, device=device)
    hidden = torch.randn(batch, length, 256, device=device)
    norm_weight = torch.ones(256, device=device)
    small = torch.zeros(8, device=device)
    pointers, integers = [small] * 15, list(range(1, 36))
    constants = dict(N=16, B1=1, B2=2, B3=3, B4=4, B5=5, B6=6, B7=7, B8=8, B9=9, B10=10)
    compiled = _sixty_one_arguments[(1,)](*pointers, *integers, **constants)
    compiled_launch = compiled[(1, 1, 1)]

    def scan() -> torch.Tensor:
        return selective_scan(x.transpose(1, 2), delta, A, B, C, D=D, z=z.transpose(1, 2), delta_bias=dt_bias,
                              delta_softplus=True, reverse=True, output_scale=0.5, backend="triton")

    rows = [
        ("selective_scan (inference, one launch)", scan),
        ("causal_conv1d_silu", lambda: causal_conv1d_silu(x, conv_weight, conv_bias)),
        ("rms_norm", lambda: rms_norm(hidden, norm_weight)),
        ("empty kernel, 10 arguments", lambda: _ten_arguments[(1,)](small, *range(1, 10), N=16)),
        ("empty kernel, 61 arguments", lambda: _sixty_one_arguments[(1,)](*pointers, *integers, **constants)),
        ("the same through CompiledKernel[grid]", lambda: compiled_launch(*pointers, *integers, *constants.values())),
        ("torch add (reference)", lambda: small.add(1.0)),
    ]
    with torch.no_grad():
        for name, call in rows:
            print(f"{name:45s} {host_us(call):8.1f} us/call", flush=True)
    training_rows(x, z, delta, A, B, C, D, dt_bias, conv_weight, conv_bias, hidden, norm_weight)
    with torch.no_grad():
        scan_triton._scan_fwd_sequential_kernel = _NoLaunch()
        print(f"{'selective_scan, its launch a no-op':45s} {host_us(scan):8.1f} us/call")


def training_rows(x, z, delta, A, B, C, D, dt_bias, conv_weight, conv_bias, hidden, norm_weight) -> None:
    """Forward + backward (``torch.autograd.grad`` of every input): host and GPU microseconds per call, whether
    a call synchronises with the GPU, and the host cost with the scan kernels' launches replaced by no-ops."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, z, delta, A, B, C, D, dt_bias)]
    xs, zs, ds, As, Bs, Cs, Ds, biases = leaves
    dy = torch.randn_like(xs.transpose(1, 2))
    conv_leaves = [t.detach().clone().requires_grad_() for t in (x, conv_weight, conv_bias)]
    norm_leaves = [t.detach().clone().requires_grad_() for t in (hidden, norm_weight)]

    def scan() -> object:
        y = selective_scan(xs.transpose(1, 2), ds, As, Bs, Cs, D=Ds, z=zs.transpose(1, 2), delta_bias=biases,
                           delta_softplus=True, reverse=True, output_scale=0.5, backend="triton")
        return torch.autograd.grad(y, leaves, dy)

    def conv() -> object:
        out = causal_conv1d_silu(*conv_leaves)
        return torch.autograd.grad(out, conv_leaves, torch.ones_like(out))

    def norm() -> object:
        out = rms_norm(*norm_leaves)
        return torch.autograd.grad(out, norm_leaves, torch.ones_like(out))

    def scale() -> object:
        out = norm_leaves[0] * 2.0
        return torch.autograd.grad(out, norm_leaves[:1], torch.ones_like(out))

    print("# forward + backward, every input's gradient; host us: back-to-back calls; GPU us: kernels' durations")
    calls = (("selective_scan", scan), ("causal_conv1d_silu", conv), ("rms_norm", norm),
             ("torch mul (reference)", scale))
    for name, call in calls:
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            synchronises = "no"
        except RuntimeError as error:
            synchronises = f"yes: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"{name + ' fwd+bwd':45s} host {host_us(call, calls=500, rounds=3):8.1f} us/call, "
              f"GPU {1e3 * kernel_ms_per_call(call):8.1f} us/call, synchronises: {synchronises}", flush=True)
    kernels = ("_scan_fwd_sequential_kernel", "_scan_bwd_sequential_kernel", "_scan_bwd_sequential_summary_kernel")
    saved = {name: getattr(scan_triton, name) for name in kernels}
    for name in kernels:
        setattr(scan_triton, name, _NoLaunch())
    no_launch_us = host_us(scan, calls=500, rounds=3)
    print(f"{'selective_scan fwd+bwd, scan launches no-ops':45s} host {no_launch_us:8.1f} us/call")
    for name, kernel in saved.items():
        setattr(scan_triton, name, kernel)
    if "--cprofile" in sys.argv:
        for name, call in calls[:3]:
            print(f"# cProfile of 200 calls of {name} fwd+bwd, by own time")
            pstats.Stats(cprofile_calls(call, 200)).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
