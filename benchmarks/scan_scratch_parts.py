"""The frame-by-frame backward scan kernel's scratch slot: chunks taken in parts (``ScanConfig.sequential_scratch_l``).

The backward kernel recomputes a chunk's states into a per-program scratch slot and walks the adjoint back
through them. With 64-frame chunks the slot holds 64 KiB per one-warp program (16 channels x 16 states x
fp32 per frame): more than the SM's cache holds for the programs resident on it. Taking the chunk in parts
of ``sequential_scratch_l`` frames shrinks the slot, at the cost of a first walk through the chunk that
finds the state entering each part. This script times the backward pass alone (``scan_backward_ablation.times``)
on DPMamba-M's shapes (``scan_state_interval.SHAPES``), fp32 and bf16, for a baseline copy of
``scan_triton.py`` (an earlier commit's, given by path) and the current module at each part length, in
interleaved rounds; it prints the median of the rounds and each compiled kernel's registers and spills.
(``results/scan_scratch_parts_2026-11-25_h100/scratch_parts.txt`` also has variants with the registers
capped at 128, from an option of commit a71e6d5 removed after that call.)

Usage (from the repository root, on a GPU)::

    git show 9271f47:speechbrain_mamba/ops/scan_triton.py > /tmp/scan_baseline.py
    python benchmarks/scan_scratch_parts.py --baseline /tmp/scan_baseline.py [--parts 64,16,8] [--rounds 3]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import load_module  # noqa: E402
from gpu_scan_kernels import header, make_inputs  # noqa: E402
from scan_backward_ablation import times  # noqa: E402
from scan_state_interval import SHAPES  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402


def registers(module) -> str:
    """Registers and spills of each compiled variant of ``module``'s frame-by-frame backward kernel."""
    kernel = module._scan_bwd_sequential_kernel
    found = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            found.append(f"{getattr(compiled, 'n_regs', '?')} regs / {getattr(compiled, 'n_spills', '?')} spills")
    return ", ".join(sorted(set(found))) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="path of a copy of scan_triton.py to compare with")
    parser.add_argument("--parts", default="64,16,8", help="values of sequential_scratch_l to compare")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    args = parser.parse_args()
    baseline = load_module(args.baseline)
    parts = [int(value) for value in args.parts.split(",")]
    variants = [("baseline", baseline, {})] + [(f"parts of {p}", scan_triton, dict(sequential_scratch_l=p))
                                               for p in parts]
    print(header(), flush=True)
    print("\nBackward pass alone, median ms of the rounds (each round: do_bench median); in brackets: / baseline\n")
    print("| dtype | shape | " + " | ".join(name for name, _, _ in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    start = time.monotonic()
    for dtype in (torch.float32, torch.bfloat16):
        for shape, batch, channels, length in SHAPES:
            inputs = make_inputs(batch, channels, length, dtype, False)
            rounds = {name: [] for name, _, _ in variants}
            for _ in range(args.rounds):
                for name, module, fields in variants:
                    rounds[name].append(times(module, inputs, fields)[1])
            medians = [statistics.median(rounds[name]) for name, _, _ in variants]
            cells = [f"{medians[0]:.3f}"] + [f"{ms:.3f} ({ms / medians[0]:.2f})" for ms in medians[1:]]
            print(f"| {str(dtype)[6:]} | {shape} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nbaseline kernel: {registers(baseline)}; current kernel: {registers(scan_triton)}")
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
