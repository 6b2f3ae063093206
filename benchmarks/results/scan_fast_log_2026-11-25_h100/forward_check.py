"""The forward scan alone, baseline copy against the current module, 7 interleaved rounds on four shapes, and the
registers and spills of every compiled variant of both modules' frame-by-frame kernels.

Run from the repository root on a GPU, with the baseline's ``scan_triton.py`` copied to the path below
(``forward_check_fast_forward_too.txt`` came from the version of commit 1c3d3a9's parent working tree that
used the fast log in the forward kernel too)::

    python benchmarks/results/scan_fast_log_2026-11-25_h100/forward_check.py .devtmp/ab/scan_baseline.py
"""
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from bench_utils import load_module  # noqa: E402
from gpu_scan_kernels import make_inputs  # noqa: E402
from scan_backward_ablation import times  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402

SHAPES = [("intra-4s-x4", 132, 512, 250), ("inter-60s", 250, 512, 481), ("intra-4s", 33, 512, 250),
          ("sepM-stage1-4s", 1, 256, 15993)]

modules = {"baseline": load_module(sys.argv[1]), "current": scan_triton}
for dtype in (torch.bfloat16, torch.float32):
    for shape, batch, channels, length in SHAPES:
        inputs = make_inputs(batch, channels, length, dtype, False)
        measured = {name: [] for name in modules}
        for round_index in range(7):
            for name in modules if round_index % 2 == 0 else list(reversed(list(modules))):
                measured[name].append(times(modules[name], inputs, {}, time_forward=True)[0])
        print(dtype, shape, {name: (round(statistics.median(values), 4), [round(v, 3) for v in values])
                             for name, values in measured.items()}, flush=True)
for name, module in modules.items():
    for kernel_name in ("_scan_fwd_sequential_kernel", "_scan_bwd_sequential_kernel"):
        for cache in getattr(getattr(module, kernel_name), "device_caches", {}).values():
            for compiled in cache[0].values():
                print(name, kernel_name, compiled.n_regs, "regs", compiled.n_spills, "spills",
                      getattr(compiled.metadata, "num_warps", "?"), "warps")
