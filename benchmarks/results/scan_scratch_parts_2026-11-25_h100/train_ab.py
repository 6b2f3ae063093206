"""A model's training step on 4 s (eager and CUDA-graphed) with the backward scan kernel's chunks taken whole
(sequential_scratch_l=64, the kernel's behaviour before) and in parts of 8 frames (the new default),
interleaved in one process over 2 rounds. Run from the repository root on a GPU; without arguments,
DPMamba-M in bf16 at batch 1 and 4 (train_ab.txt):

    python benchmarks/results/scan_scratch_parts_2026-11-25_h100/train_ab.py [model[:option=value]] \\
        [dtypes] [batches]

e.g. ``sepmamba_m:recompute_projections=True fp32,bf16 1`` (train_ab_sepmamba_m.txt)."""
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path("benchmarks").resolve()))
sys.path.insert(0, str(Path(".").resolve()))
import bench_utils  # noqa: E402
from cuda_graphs import measure_training  # noqa: E402
from gpu_scan_kernels import header  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402

model, dtypes, batches = (sys.argv[1:] + ["dpmamba_m", "bf16", "1,4"][len(sys.argv) - 1:])[:3]
default = scan_triton.BACKWARD_CONFIG
print(header(), flush=True)
stem, overrides = bench_utils.parse_model(model)
modules, num_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / f"{stem}.yaml", torch.device("cuda"),
                                              overrides)
for round_ in range(2):
    for dtype in dtypes.split(","):
        for batch in map(int, batches.split(",")):
            for parts in (64, 8):
                scan_triton.BACKWARD_CONFIG = replace(default, sequential_scratch_l=parts)
                row = measure_training(modules, num_spks, 4.0, batch, dtype, 5)
                print(f"round {round_} {model} {dtype} batch {batch} parts of {parts}: eager {row['eager_ms']} ms, "
                      f"graphed {row['graph_ms']} ms", flush=True)
