"""Selective-scan kernels on the GPU: time, achieved bandwidth and memory on DPMamba's and SepMamba's shapes.

For every shape, dtype and backend it times the forward pass (under
``inference_mode``) and forward + backward (all gradients) with
``triton.testing.do_bench`` (CUDA events, median, L2 flushed between runs), and
reports the bandwidth of the bytes that must move: forward reads ``u, delta,
z, B, C`` and writes ``y``; backward also reads them and ``dy`` and writes
``du, ddelta, dz, dB, dC`` (A, D and delta_bias are negligible). A device-to-
device copy gives the measured ceiling next to the H100's 3350 GB/s peak.
Peak memory of forward + backward is the peak allocated minus what was
allocated before (inputs excluded).

Usage::

    python benchmarks/gpu_scan_kernels.py --out benchmarks/results/gpu_scan_kernels
    python benchmarks/gpu_scan_kernels.py --sweep     # tile sizes of the Triton kernels

Writes ``<out>.csv`` and ``<out>.md``.
"""

import argparse
import csv
import functools
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechbrain_mamba.ops import selective_scan  # noqa: E402
from speechbrain_mamba.ops.scan_mamba_ssm import load_mamba_ssm_scan  # noqa: E402

H100_PEAK_GBS = 3350.0
N_STATE = 16
# name, batch (sequences), channels E, length L. DPMamba: 4/16/60 s at 8 kHz, encoder stride 8,
# chunks of 250 with hop 125 (S = 33/129/481). SepMamba-M: stage lengths of a 4 s input.
SHAPES = [
    ("dpm-intra-4s", 33, 512, 250),
    ("dpm-inter-4s", 250, 512, 33),
    ("dpm-intra-16s", 129, 512, 250),
    ("dpm-inter-16s", 250, 512, 129),
    ("dpm-inter-60s", 250, 512, 481),
    ("dpm-intra-4s-E256", 33, 256, 250),
    ("dpm-intra-4s-E1024", 33, 1024, 250),
    ("sepM-stage1-4s", 1, 256, 15993),
    ("sepM-stage2-4s", 1, 512, 7989),
    ("sepM-stage3-4s", 1, 1024, 3987),
    ("sepM-stage1-4s-b4", 4, 256, 15993),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(batch, channels, length, dtype, grad, layout="channel-last"):
    """Scan inputs. ``channel-last``: as the Mamba mixer passes them (frames of its projections,
    read through transposed views); ``channel-first``: contiguous (batch, E, L) and (batch, N, L)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731

    def activation(*shape, scale=1.0):  # (batch, channels or N, length)
        if layout == "channel-first":
            return (scale * rand(*shape)).to(dtype)
        return (scale * rand(shape[0], shape[2], shape[1])).to(dtype).transpose(1, 2)

    inputs = dict(
        u=activation(batch, channels, length),
        delta=activation(batch, channels, length, scale=0.5),
        A=-0.5 - 4 * torch.rand(channels, N_STATE, device="cuda", generator=g),
        B=activation(batch, N_STATE, length),
        C=activation(batch, N_STATE, length),
        D=rand(channels),
        z=activation(batch, channels, length),
        delta_bias=0.5 * rand(channels) - 1,
    )
    return {k: v.requires_grad_(grad) for k, v in inputs.items()}


def bytes_moved(batch, channels, length, dtype, backward):
    size = torch.tensor([], dtype=dtype).element_size()
    per_channel, per_state = (4, 2) if not backward else (4 + 7, 2 + 4)
    return size * length * batch * (per_channel * channels + per_state * N_STATE)


def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    import triton.testing

    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def time_point(backend, inputs, backward, **scan_kwargs):
    import triton.testing

    names = [k for k, v in inputs.items() if v.requires_grad]
    if not backward:
        def run():
            with torch.inference_mode():
                selective_scan(**inputs, delta_softplus=True, backend=backend, **scan_kwargs)
    else:
        dy = torch.randn_like(inputs["u"])

        def run():
            y = selective_scan(**inputs, delta_softplus=True, backend=backend, **scan_kwargs)
            torch.autograd.grad(y, [inputs[n] for n in names], dy)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")
    return ms, peak_mib


def benchmark(args):
    backends = args.backends.split(",")
    if "mamba_ssm" in backends and load_mamba_ssm_scan() is None:
        print("mamba_ssm is not importable here: left out")
        backends.remove("mamba_ssm")
    ceiling = copy_bandwidth()
    print(f"device-to-device copy: {ceiling:.0f} GB/s (H100 peak {H100_PEAK_GBS:.0f})")
    rows = []
    for name, batch, channels, length in SHAPES:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for backward in (False, True):
                # mamba-ssm's kernel reads contiguous (batch, E, L) inputs (it copies any others first).
                layouts = {b: "channel-first" if b == "mamba_ssm" else args.layout for b in backends}
                inputs = {layout: make_inputs(batch, channels, length, dtype, backward, layout)
                          for layout in set(layouts.values())}
                moved = bytes_moved(batch, channels, length, dtype, backward)
                for backend in backends:
                    try:
                        ms, mib = time_point(backend, inputs[layouts[backend]], backward)
                    except torch.OutOfMemoryError:
                        ms, mib = float("nan"), float("nan")
                        torch.cuda.empty_cache()
                    row = dict(**{"pass": "fwd+bwd" if backward else "fwd"}, shape=name, batch=batch, E=channels,
                               L=length, N=N_STATE, dtype=dtype_name, backend=backend, ms=round(ms, 4),
                               GBps=round(moved / ms / 1e6, 1),
                               pct_peak=round(100 * moved / ms / 1e6 / H100_PEAK_GBS, 1), peak_MiB=round(mib, 1))
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                del inputs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Selective-scan kernels, {header()}", "",
             f"Device-to-device copy: {ceiling:.0f} GB/s; H100 peak {H100_PEAK_GBS:.0f} GB/s. "
             f"GB/s = bytes that must move / median time; N = 16, forward direction, {args.layout} inputs"
             + (" (mamba_ssm: channel-first, the layout its kernel reads)" if "mamba_ssm" in backends else "")
             + ".", ""]
    ratios = [b for b in ("torch", "mamba_ssm") if b in backends and "triton" in backends]
    for backward in ("fwd", "fwd+bwd"):
        lines += [f"## {backward}", "", "| shape (batch, E, L) | dtype | " + " | ".join(
            f"{b} ms | {b} GB/s | {b} MiB" for b in backends) + "".join(f" | {b} / triton" for b in ratios) + " |",
            "|---|---|" + "---|---|---|" * len(backends) + "---|" * len(ratios)]
        for name, batch, channels, length in SHAPES:
            for dtype_name in args.dtypes.split(","):
                sel = {r["backend"]: r for r in rows
                       if r["shape"] == name and r["dtype"] == dtype_name and r["pass"] == backward}
                cells = " | ".join(f"{sel[b]['ms']} | {sel[b]['GBps']} | {sel[b]['peak_MiB']}" for b in backends)
                ratio = "".join(f" | {sel[b]['ms'] / sel['triton']['ms']:.2f}x" for b in ratios)
                lines.append(f"| {name} ({batch}, {channels}, {length}) | {dtype_name} | {cells}{ratio} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def sweep(args):
    """Times a few tile shapes of the Triton kernels on the main shapes (fp32 and bf16)."""
    from speechbrain_mamba.ops.scan_triton import ScanConfig, selective_scan_triton
    from speechbrain_mamba.ops.selective_scan import BACKENDS

    configs = {f"{e}x{l}w{w}": ScanConfig(block_e=e, block_l=l, num_warps=w, sequential_min_rows=0)
               for e, l, w in [(16, 32, 4), (32, 16, 4), (16, 32, 2), (8, 32, 2)]}
    configs.update({f"seq{e}w{w}": ScanConfig(sequential_min_rows=1, sequential_block_e=e,
                                              sequential_num_warps=w)
                    for e, w in [(8, 1), (16, 1), (16, 2), (32, 1), (32, 2)]})
    for name, batch, channels, length in [SHAPES[0], SHAPES[3], SHAPES[8]]:
        for dtype_name in args.dtypes.split(","):
            for backward in (False, True):
                inputs = make_inputs(batch, channels, length, DTYPES[dtype_name], backward, args.layout)
                times = []
                for label, config in configs.items():
                    # The backward pass uses the forward pass's chunks.
                    BACKENDS["sweep"] = functools.partial(selective_scan_triton, forward_config=config,
                                                          backward_config=config)
                    try:
                        ms, _ = time_point("sweep", inputs, backward)
                    except Exception as error:  # a tile that does not compile (too many registers)
                        ms = float("nan")
                        print(f"  {label}: {type(error).__name__}")
                    times.append(f"{label}={ms:.4f}")
                print(f"sweep {name} {dtype_name} {'fwd+bwd' if backward else 'fwd'}: " + " ".join(times),
                      flush=True)


def header():
    import triton

    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"Python {platform.python_version()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu_scan_kernels", help="output path, no suffix")
    parser.add_argument("--backends", default="triton,torch,mamba_ssm")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--sweep", action="store_true", help="time tile sizes of the Triton kernels instead")
    parser.add_argument("--layout", choices=["channel-last", "channel-first"], default="channel-last",
                        help="memory layout of the activations (channel-last: as the Mamba mixer passes them)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    print(header(), flush=True)
    sweep(args) if args.sweep else benchmark(args)


if __name__ == "__main__":
    main()
