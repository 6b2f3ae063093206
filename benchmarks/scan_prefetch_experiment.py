"""Frame-by-frame scan kernels: a baseline copy of ``scan_triton.py`` vs the current one's prefetch/unroll settings.

The frame-by-frame kernels (``_scan_fwd_sequential_kernel``, ``_scan_bwd_sequential_kernel``) load each
frame ``sequential_prefetch`` frames ahead of its arithmetic and unroll ``sequential_unroll`` frames per
loop step. This script times, on DPMamba-M's intra/inter shapes (channel-last inputs as the mixer passes
them; ``gpu_scan_kernels.py``'s inputs, timing and byte counts), the baseline module (a copy of
``speechbrain_mamba/ops/scan_triton.py`` from an earlier commit, given by path) against settings of the
current one. It prints one line per shape with ms, GB/s and the first call's time (compilation).

Usage (from the repository root, on a GPU)::

    git show f1cf5ed:speechbrain_mamba/ops/scan_triton.py > /tmp/scan_baseline.py
    python benchmarks/scan_prefetch_experiment.py --baseline /tmp/scan_baseline.py --step prefetch
    python benchmarks/scan_prefetch_experiment.py --baseline /tmp/scan_baseline.py --step unroll
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import load_module  # noqa: E402
from gpu_scan_kernels import bytes_moved, copy_bandwidth, header, make_inputs, time_point  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402
from speechbrain_mamba.ops.selective_scan import BACKENDS  # noqa: E402

SHAPES = [("intra-4s", 33, 512, 250), ("inter-4s", 250, 512, 33), ("intra-16s", 129, 512, 250),
          ("inter-16s", 250, 512, 129), ("intra-60s", 481, 512, 250), ("inter-60s", 250, 512, 481)]
FORWARD = {"fp32": scan_triton.FORWARD_CONFIG_FP32, "bf16": scan_triton.FORWARD_CONFIG}


def register(name: str, forward: dict, backward: dict = None, bf16_forward: dict = None) -> None:
    """Backends ``<name>-fp32`` and ``<name>-bf16``: the current kernels with these config fields
    (``bf16_forward``: more forward fields for bf16)."""
    for dtype, base in FORWARD.items():
        fields = {**forward, **(bf16_forward or {})} if dtype == "bf16" else forward
        BACKENDS[f"{name}-{dtype}"] = functools.partial(
            scan_triton.selective_scan_triton, forward_config=scan_triton.replace(base, **fields),
            backward_config=scan_triton.replace(scan_triton.BACKWARD_CONFIG, **(backward or {})))


def run(dtype: str, backward: bool, backends, shapes=SHAPES, start=time.monotonic()) -> None:
    for name, batch, channels, length in shapes:
        inputs = make_inputs(batch, channels, length, torch.float32 if dtype == "fp32" else torch.bfloat16,
                             backward)
        cells = []
        for backend in backends:
            backend = backend if backend == "baseline" else f"{backend}-{dtype}"
            first = time.monotonic()
            ms, _ = time_point(backend, inputs, backward)
            gbs = bytes_moved(batch, channels, length, inputs["u"].dtype, backward) / ms / 1e6
            cells.append(f"{backend}={ms:.3f}ms/{gbs:.0f}GBps(c{time.monotonic() - first:.0f}s)")
        print(f"[{time.monotonic() - start:.0f}s] {'fwd+bwd' if backward else 'fwd'} {dtype} {name}: "
              + " ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="path of a copy of scan_triton.py to compare with")
    parser.add_argument("--step", choices=["prefetch", "unroll"], required=True,
                        help="prefetch: distances 2/4/8 with whole 32-frame chunks unrolled; "
                             "unroll: 8 vs 16 frames unrolled, backward prefetch 1 vs 2")
    args = parser.parse_args()
    baseline = load_module(args.baseline)
    BACKENDS["baseline"] = baseline.selective_scan_triton
    print(header(), f"device-to-device copy {copy_bandwidth():.0f} GB/s", flush=True)
    if args.step == "prefetch":
        # As run on 2026-11-24: bf16 with 16 channels per program, "p4-e32" with 32.
        for distance in (2, 4, 8):
            register(f"p{distance}", dict(sequential_prefetch=distance, sequential_unroll=32),
                     dict(sequential_prefetch=distance), dict(sequential_block_e=16))
        register("p4-e32", dict(sequential_prefetch=4, sequential_unroll=32, sequential_wide_min_rows=0))
        run("fp32", False, ["baseline", "p4"])
        run("bf16", False, ["baseline", "p4", "p4-e32"])
        run("fp32", True, ["baseline", "p4"])
        run("bf16", True, ["baseline", "p4"])
        run("fp32", False, ["p2", "p8"])
        run("bf16", False, ["p2", "p8"])
    else:
        for frames in (8, 16):
            register(f"u{frames}", dict(sequential_unroll=frames))
        for distance in (1, 2):
            register(f"b{distance}", {}, dict(sequential_prefetch=distance))
        run("fp32", False, ["baseline", "u8", "u16"])
        run("bf16", False, ["baseline", "u8", "u16"])
        some = [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[5]]
        run("fp32", True, ["baseline", "b1", "b2"], some)
        run("bf16", True, ["baseline", "b1", "b2"], some)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
