"""DPMamba-M's training step (4 s, bf16; eager and CUDA-graphed) with the backward scan kernel's chunks taken
whole (sequential_scratch_l=64, the kernel's behaviour before) and in parts of 8 frames (the new default),
interleaved in one process. Run from the repository root on a GPU:
python benchmarks/results/scan_scratch_parts_2026-11-25_h100/train_ab.py"""
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

default = scan_triton.BACKWARD_CONFIG
print(header(), flush=True)
modules, num_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / "dpmamba_m.yaml", torch.device("cuda"), {})
for round_ in range(2):
    for batch in (1, 4):
        for parts in (64, 8):
            scan_triton.BACKWARD_CONFIG = replace(default, sequential_scratch_l=parts)
            row = measure_training(modules, num_spks, 4.0, batch, "bf16", 5)
            print(f"round {round_} batch {batch} parts of {parts}: eager {row['eager_ms']} ms, "
                  f"graphed {row['graph_ms']} ms", flush=True)
