"""Few long sequences (SepMamba's stages): the chunked kernels vs the frame-by-frame ones over segments.

Below ``sequential_min_rows`` (sequences x channels), the frame-by-frame kernels split time into segments
until about ``sequential_split_programs`` programs run; 0 runs the chunked kernels instead. This script
times both on SepMamba-M's stage shapes (``gpu_scan_kernels.py``'s inputs, timing and byte counts): the
forward pass for several program targets of the forward config; forward + backward at the default forward
config for several program targets of the backward config (``b0``: the chunked backward kernel). Prints one
line per shape: ms, GB/s, peak MiB, first call's time (compilation).

Usage (from the repository root, on a GPU)::

    python benchmarks/scan_split_experiment.py
"""
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_scan_kernels import bytes_moved, header, make_inputs, time_point  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402
from speechbrain_mamba.ops.selective_scan import BACKENDS  # noqa: E402

# SepMamba-M's stage lengths at 4 s (and stage 1 at 60 s), batch 1 (and 4).
SHAPES = [("sepM-stage1-4s", 1, 256, 15993), ("sepM-stage2-4s", 1, 512, 7989), ("sepM-stage3-4s", 1, 1024, 3987),
          ("sepM-stage1-60s", 1, 256, 239993), ("sepM-stage1-4s-b4", 4, 256, 15993)]
TARGETS = (0, 1024, 2048, 4096, 8192)


def main() -> None:
    start = time.monotonic()
    for dtype, base in (("fp32", scan_triton.FORWARD_CONFIG_FP32), ("bf16", scan_triton.FORWARD_CONFIG)):
        for target in TARGETS:
            BACKENDS[f"s{target}-{dtype}"] = functools.partial(
                scan_triton.selective_scan_triton,
                forward_config=scan_triton.replace(base, sequential_split_programs=target))
            BACKENDS[f"b{target}-{dtype}"] = functools.partial(
                scan_triton.selective_scan_triton, forward_config=base,
                backward_config=scan_triton.replace(scan_triton.BACKWARD_CONFIG, sequential_split_programs=target))
    print(header(), flush=True)
    for dtype in ("fp32", "bf16"):
        for backward in (False, True):
            for name, batch, channels, length in SHAPES:
                if backward and "60s" in name:
                    continue
                inputs = make_inputs(batch, channels, length, torch.float32 if dtype == "fp32" else torch.bfloat16,
                                     backward)
                cells = []
                for target in TARGETS:
                    first = time.monotonic()
                    label = f"{'b' if backward else 's'}{target}"
                    ms, mib = time_point(f"{label}-{dtype}", inputs, backward)
                    gbs = bytes_moved(batch, channels, length, inputs["u"].dtype, backward) / ms / 1e6
                    cells.append(f"{label}={ms:.3f}ms/{gbs:.0f}GBps/{mib:.0f}MiB(c{time.monotonic() - first:.0f}s)")
                print(f"[{time.monotonic() - start:.0f}s] {'fwd+bwd' if backward else 'fwd'} {dtype} {name}: "
                      + " ".join(cells), flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
