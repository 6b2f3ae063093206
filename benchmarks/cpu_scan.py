"""CPU benchmark: the chunked PyTorch selective scan against the step-by-step loop.

Shapes are those DPMamba-XS's intra and inter BiMamba blocks see for a 4 s
mixture at 8 kHz (encoder stride 8 -> 3999 frames, K=250 -> S=34 chunks;
d_inner 256, d_state 16), with z, D and the dt bias as the lobes pass them.
Each point runs in a fresh process so that its peak resident memory (above what
the inputs already hold) is its own. Allocator: glibc's default, and glibc told
to keep freed memory (GLIBC_TUNABLES below): freshly mapped pages of large
tensors are page-faulted on first touch, which dominates CPU time otherwise.

Usage: python benchmarks/cpu_scan.py [--threads 2] [--output benchmarks/results/cpu_scan.md]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_utils import RESULTS_DIR, machine_description, reset_peak_rss, status_kib

SHAPES = {"intra": (34, 256, 16, 250), "inter": (250, 256, 16, 34)}  # batch, channels, N, length
KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def measure(shape: str, backend: str, mode: str, threads: int, repeats: int) -> dict:
    """Runs in the child process: median time and peak extra RSS of one configuration."""
    from speechbrain_mamba.ops import selective_scan

    torch.set_num_threads(threads)
    batch, channels, state, length = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        u=torch.randn(batch, channels, length, generator=g),
        delta=torch.randn(batch, channels, length, generator=g),
        A=-torch.rand(channels, state, generator=g) * 4,
        B=torch.randn(batch, state, length, generator=g),
        C=torch.randn(batch, state, length, generator=g),
        D=torch.randn(channels, generator=g),
        z=torch.randn(batch, channels, length, generator=g),
        delta_bias=torch.randn(channels, generator=g),
    )

    def run():
        if mode == "forward":
            with torch.inference_mode():
                selective_scan(**inputs, delta_softplus=True, backend=backend)
        else:
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            selective_scan(**leaves, delta_softplus=True, backend=backend).sum().backward()

    baseline = reset_peak_rss()  # so that only the scan counts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM")
    return {"time_ms": 1e3 * statistics.median(times), "peak_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cpu_scan.md")
    parser.add_argument("--child", nargs=4, metavar=("SHAPE", "BACKEND", "MODE", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, backend, mode, repeats = args.child
        print(json.dumps(measure(shape, backend, mode, args.threads, int(repeats))))
        return

    machine = machine_description(args.threads)
    print(f"# selective scan on CPU: {machine}", flush=True)
    rows = []
    for allocator, env_extra in (("default", {}), ("keep freed", {"GLIBC_TUNABLES": KEEP_FREED_MEMORY})):
        for shape in SHAPES:
            for mode in ("forward", "forward+backward"):
                for backend in ("reference", "torch"):
                    # The loop's backward takes tens of seconds: one run is enough.
                    repeats = 1 if (backend, mode) == ("reference", "forward+backward") else 3
                    result = subprocess.run(
                        [sys.executable, __file__, "--threads", str(args.threads),
                         "--child", shape, backend, mode, str(repeats)],
                        check=True, capture_output=True, text=True, env={**os.environ, **env_extra},
                    )
                    point = json.loads(result.stdout)
                    rows.append((allocator, shape, mode, backend, point["time_ms"], point["peak_mib"]))
                    print(f"{allocator:10s} {shape:5s} {mode:16s} {backend:9s} "
                          f"{point['time_ms']:9.1f} ms {point['peak_mib']:8.1f} MiB", flush=True)

    lines = [
        "# Selective scan on the CPU: chunked PyTorch backend vs loop reference",
        "",
        f"Machine: {machine}.",
        "Shapes: DPMamba-XS BiMamba blocks on a 4 s mixture (batch x d_inner x d_state x length): "
        + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in SHAPES.items()) + ".",
        "Time: median of 3 runs (1 for the loop's forward+backward); memory: peak RSS above the inputs, fresh process.",
        f"Allocator 'keep freed' = GLIBC_TUNABLES={KEEP_FREED_MEMORY}.",
        "Produced by `python benchmarks/cpu_scan.py`.",
        "",
        "| allocator | shape | mode | loop ms | torch ms | speed-up | loop MiB | torch MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(a, s, m, b): (t, p) for a, s, m, b, t, p in rows}
    for allocator, shape, mode in dict.fromkeys((a, s, m) for a, s, m, *_ in rows):
        loop, fast = by_key[allocator, shape, mode, "reference"], by_key[allocator, shape, mode, "torch"]
        lines.append(f"| {allocator} | {shape} | {mode} | {loop[0]:.0f} | {fast[0]:.0f} | "
                     f"{loop[0] / fast[0]:.1f}x | {loop[1]:.0f} | {fast[1]:.0f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
