"""Frames per chunk of the frame-by-frame scan kernels (``ScanConfig.sequential_block_l``): time and memory.

When the frame-by-frame kernels run both passes, the forward pass stores the fp32 state entering every chunk
but the first, and the backward pass recomputes a chunk's states into a per-program scratch slot of that many
frames. Longer chunks store fewer states (none at all for DPMamba's 33-34-frame inter-chunk sequences from 64
frames on) but make the slot larger. For each chunk length, on DPMamba-M's intra- and inter-chunk shapes
(4 s at batch 1 and 4, 60 s at batch 1; inputs of ``gpu_scan_kernels.py``, channel-last), fp32 and bf16:
the forward and backward times (``triton.testing.do_bench``, median; the backward alone, its chunk states
made once outside the timing) and the stored states' MiB.

Usage (from the repository root, on a GPU)::

    python benchmarks/scan_state_interval.py [--chunks 32,64,128]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_scan_kernels import header, make_inputs  # noqa: E402
from scan_backward_ablation import times  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402

# name, sequences, channels, frames: DPMamba-M (250-frame chunks, 512 channels after in_proj).
SHAPES = [("intra-4s", 33, 512, 250), ("inter-4s", 250, 512, 33), ("intra-4s-x4", 132, 512, 250),
          ("inter-4s-x4", 1000, 512, 33), ("intra-60s", 481, 512, 250), ("inter-60s", 250, 512, 481)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default="32,64,128", help="values of sequential_block_l to compare")
    args = parser.parse_args()
    chunk_lengths = [int(value) for value in args.chunks.split(",")]
    print(header(), flush=True)
    print(f"default sequential_block_l: {scan_triton.FORWARD_CONFIG.sequential_block_l}\n")
    print("| dtype | shape | " + " | ".join(f"{c} frames: fwd ms / bwd ms / states MiB" for c in chunk_lengths) + " |")
    print("|---|---|" + "---|" * len(chunk_lengths))
    start = time.monotonic()
    for dtype in (torch.float32, torch.bfloat16):
        for shape, batch, channels, length in SHAPES:
            inputs = make_inputs(batch, channels, length, dtype, False)
            cells = []
            for chunk in chunk_lengths:
                forward_ms, backward_ms, stored = times(scan_triton, inputs, {}, time_forward=True,
                                                        forward_fields=dict(sequential_block_l=chunk))
                cells.append(f"{forward_ms:.3f} / {backward_ms:.3f} / {stored / 2**20:.0f}")
            print(f"| {str(dtype)[6:]} | {shape} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
