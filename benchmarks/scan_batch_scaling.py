"""Would one launch for both scan directions pay? The scan kernels' forward and backward time at a batch and at
twice that batch.

A bidirectional layer runs two scans of the same shape one after the other; one launch over both would cost
about the time of the doubled batch. Shapes: DPMamba-M's intra- and inter-chunk sequences on 4 s at batch 1
and 4 (``scan_state_interval.SHAPES``) and SepMamba-M's first and deepest stages on 4 s; ``do_bench`` medians of
``scan_backward_ablation.times``.

Usage (from the repository root, on a GPU)::

    python benchmarks/scan_batch_scaling.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_scan_kernels import header, make_inputs  # noqa: E402
from scan_backward_ablation import times  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402

SHAPES = [("intra-4s", 33, 512, 250), ("inter-4s", 250, 512, 33), ("intra-4s-x4", 132, 512, 250),
          ("inter-4s-x4", 1000, 512, 33), ("sepM-stage1-4s", 1, 256, 15993), ("sepM-stage3-4s", 1, 1024, 3987)]


def main() -> None:
    print(header())
    print("| dtype | shape | fwd x1 | fwd x2 | bwd x1 | bwd x2 | saved by one launch (2 * x1 - x2), fwd + bwd |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for name, batch, channels, length in SHAPES:
            (f1, b1, _), (f2, b2, _) = (times(scan_triton, make_inputs(b, channels, length, dtype, False), {},
                                              time_forward=True) for b in (batch, 2 * batch))
            print(f"| {str(dtype)[6:]} | {name} | {f1:.3f} | {f2:.3f} | {b1:.3f} | {b2:.3f} "
                  f"| {2 * (f1 + b1) - (f2 + b2):.3f} |", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
