"""The Mamba blocks' norms on their two backends: the norms alone, and whole models with one or the other.

- The norms alone: forward and forward + backward GPU time (kernel time under the profiler, mean of 20
  calls) of ``rms_norm`` / ``layer_norm`` with ``backend="torch"`` (``F.rms_norm`` in fp32 between casts,
  ``F.layer_norm``) and ``backend="triton"``, on DPMamba-M's intra- and inter-chunk rows (256 features)
  and SepMamba-M's stages, fp32 and bf16.
- Whole models (``--models``, ``model[:option=value]:dtype:batch``): eager inference on 1 and 4 s and the
  training step on 4 s, eager and CUDA-graphed (``cuda_graphs.measure_training``), the norm modules
  (``RMSNorm``, ``LayerNorm``) on one backend then the other in interleaved rounds
  (``scan_ab.interleaved``); medians and ratio triton / torch.

Usage (from the repository root, on a GPU)::

    python benchmarks/norm.py [--models dpmamba_m:bf16:1,dpmamba_m:bf16:4,sepmamba_m:fp32:1] [--rounds 3]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_utils  # noqa: E402
from cuda_graphs import measure_training  # noqa: E402
from gpu_scan_kernels import header  # noqa: E402
from scan_ab import interleaved, model_cases, ratio_cell  # noqa: E402
import speechbrain_mamba.ops.norm as norm_module  # noqa: E402
from speechbrain_mamba.ops.norm import layer_norm, rms_norm  # noqa: E402

TRITON_MAX_FEATURES = norm_module.TRITON_MAX_FEATURES

# (norm, name, rows as (batch, time), features): DPMamba-M's intra- and inter-chunk stacks on 4 s at batch 4
# and 60 s; SepMamba-M's first and deepest stages on 4 s (d_model 128 and 512).
SHAPES = [("rms", "intra-4s-x4", (132, 250), 256), ("rms", "inter-4s-x4", (1000, 33), 256),
          ("rms", "intra-60s", (481, 250), 256), ("layer", "sepM-stage1-4s", (1, 15993), 128),
          ("layer", "sepM-stage3-4s", (1, 3987), 512)]
BACKENDS = ("torch", "triton")


def gpu_ms(fn, calls: int = 20) -> float:
    """GPU time per call: the kernels' total time under the profiler (a lone norm is short enough that
    timing it from the host measures the host)."""
    from torch.profiler import ProfilerActivity, profile

    from profile_model import kernel_totals

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_totals(prof)[1] / calls


def time_norm(kind, shape, dtype) -> dict:
    """{backend: (forward ms, forward + backward ms)}, GPU time."""
    (batch, frames), features = shape
    x = torch.randn(batch, frames, features, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.ones(features, device="cuda", requires_grad=True)
    bias = torch.zeros(features, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    results = {}
    for backend in BACKENDS:
        if kind == "rms":
            def norm():
                return rms_norm(x, weight, backend=backend)
            params = (x, weight)
        else:
            def norm():
                return layer_norm(x, weight, bias, backend=backend)
            params = (x, weight, bias)

        # bf16 as in the models: under autocast (PyTorch's layer_norm takes no bf16 input with fp32
        # parameters outside it; both backends then return fp32).
        autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

        def forward():
            with torch.no_grad(), torch.autocast(**autocast):
                norm()

        def both():
            with torch.autocast(**autocast):
                out = norm()
            torch.autograd.grad(out, params, grad.to(out.dtype))

        results[backend] = (gpu_ms(forward), gpu_ms(both))
    return results


def use_backend(backend: str) -> None:
    """Points the norm modules' "auto" at ``backend`` (with no width fitting Triton, "auto" takes PyTorch)."""
    norm_module.TRITON_MAX_FEATURES = TRITON_MAX_FEATURES if backend == "triton" else 0


def compare_models(cases: str, rounds: int) -> None:
    """Eager inference and training steps of whole models, the norm modules on each backend in turn."""
    device = torch.device("cuda")
    print(f"\nWhole models, median ms of {rounds} interleaved rounds (training: median of 5 steps), "
          "torch / triton (ratio)\n")
    print("| model | dtype | batch | inference 1 s, eager | inference 4 s, eager | training 4 s, eager "
          "| training 4 s, graphed |")
    print("|---|---|---|---|---|---|---|")
    for model, dtype, batch, net, num_spks in model_cases(cases, device):

        def measure(backend):
            use_backend(backend)
            row = {}
            for seconds in (1, 4):
                mixture, _ = bench_utils.random_batch(batch, seconds * bench_utils.SAMPLE_RATE, num_spks, device)
                step = bench_utils.inference_step(net, num_spks, mixture, dtype)
                times, _ = bench_utils.time_and_memory(step, device, warmup=2, repeats=10)
                row[f"infer_{seconds}"] = bench_utils.median(times)
            return dict(row, **measure_training(net, num_spks, 4.0, batch, dtype, 5))

        measured = interleaved(list(BACKENDS), rounds, measure)
        keys = ("infer_1", "infer_4", "eager_ms", "graph_ms")
        cells = [ratio_cell(measured, lambda row, key=key: row[key]) for key in keys]
        print(f"| {model} | {dtype} | {batch} | " + " | ".join(cells) + " |", flush=True)
    use_backend("triton")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dpmamba_m:bf16:1,dpmamba_m:bf16:4", help="model:dtype:batch cases")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(header(), flush=True)
    start = time.monotonic()
    print("\nThe norms alone, GPU ms per call: forward / forward + backward\n")
    print("| norm | dtype | shape | torch | triton | triton / torch |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for kind, name, rows, features in SHAPES:
            results = time_norm(kind, (rows, features), dtype)
            (tf, tb), (rf, rb) = results["torch"], results["triton"]
            print(f"| {kind} | {str(dtype)[6:]} | {name} | {tf:.3f} / {tb:.3f} | {rf:.3f} / {rb:.3f} "
                  f"| {rf / tf:.2f} / {rb / tb:.2f} |", flush=True)
    if args.models:
        compare_models(args.models, args.rounds)
    print(f"\n({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
