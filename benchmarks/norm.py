"""The models' norms on their two backends: the norms alone, and whole models with one or the other.

- The norms alone: forward and forward + backward GPU time (kernel time under the profiler, mean of 20
  calls) of ``rms_norm`` / ``layer_norm`` / ``single_group_norm`` with ``backend="torch"``
  (``F.rms_norm`` in fp32 between casts, ``F.layer_norm``, ``torch.var_mean`` and an affine map, then
  the residual sum) and ``backend="triton"``, on DPMamba-M's intra- and inter-chunk rows (256 features),
  SepMamba-M's stages and DPMamba-M's dual-path activations (with their residual), fp32 and bf16.
- Whole models (``--models``, ``model[:option=value]:dtype:batch``): eager inference on 1 and 4 s and the
  training step on 4 s, eager and CUDA-graphed (``cuda_graphs.measure_training``), the norm modules
  (``--switch all``: ``RMSNorm``, ``LayerNorm`` and ``SingleGroupNorm``; ``--switch group``: the last
  alone) on one backend then the other in interleaved rounds (``scan_ab.interleaved``); medians and
  ratio triton / torch.

Usage (from the repository root, on a GPU)::

    python benchmarks/norm.py [--models dpmamba_m:bf16:1,dpmamba_m:bf16:4,sepmamba_m:fp32:1] [--rounds 3] \
        [--switch all|group] [--no-alone]
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_utils  # noqa: E402
from cuda_graphs import measure_training  # noqa: E402
from profile_model import kernel_ms_per_call  # noqa: E402
from gpu_scan_kernels import header  # noqa: E402
from scan_ab import interleaved, model_cases, ratio_cell  # noqa: E402
import speechbrain_mamba.lobes.norms as norm_lobes  # noqa: E402
import speechbrain_mamba.ops.norm as norm_module  # noqa: E402
from speechbrain_mamba.ops.norm import layer_norm, rms_norm, single_group_norm  # noqa: E402

TRITON_MAX_FEATURES = norm_module.TRITON_MAX_FEATURES

# (norm, name, rows as (batch, time), features): DPMamba-M's intra- and inter-chunk stacks on 4 s at batch 4
# and 60 s; SepMamba-M's first and deepest stages on 4 s (d_model 128 and 512); DPMamba-M's dual-path
# activations [batch, 256, K = 250, S chunks] (as (batch, S), 256) on 4 s at batch 1 and 4, and 60 s.
SHAPES = [("rms", "intra-4s-x4", (132, 250), 256), ("rms", "inter-4s-x4", (1000, 33), 256),
          ("rms", "intra-60s", (481, 250), 256), ("layer", "sepM-stage1-4s", (1, 15993), 128),
          ("layer", "sepM-stage3-4s", (1, 3987), 512), ("group", "dual-path-4s", (1, 34), 256),
          ("group", "dual-path-4s-x4", (4, 34), 256), ("group", "dual-path-60s", (1, 482), 256)]
BACKENDS = ("torch", "triton")


def time_norm(kind, shape, dtype) -> dict:
    """{backend: (forward ms, forward + backward ms)}, GPU time."""
    (batch, frames), features = shape
    if kind == "group":  # [batch, N, K, S] on [batch, S, K, N] storage; the residual on [batch, K, S, N]
        x = torch.randn(batch, frames, 250, features, device="cuda", dtype=dtype).permute(0, 3, 2, 1)
        residual = torch.randn(batch, 250, frames, features, device="cuda", dtype=dtype).permute(0, 3, 1, 2)
        x.requires_grad_(), residual.requires_grad_()
    else:
        x = torch.randn(batch, frames, features, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.ones(features, device="cuda", requires_grad=True)
    bias = torch.zeros(features, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    results = {}
    for backend in BACKENDS:
        if kind == "group":
            def norm():
                return single_group_norm(x, weight, bias, 1e-8, residual, backend=backend)
            params = (x, weight, bias, residual)
        elif kind == "rms":
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

        results[backend] = (kernel_ms_per_call(forward), kernel_ms_per_call(both))
    return results


SINGLE_GROUP_NORM = norm_lobes.single_group_norm


def use_backend(backend: str, switch: str) -> None:
    """Points the norm modules (``switch``: all, or ``group``: ``SingleGroupNorm`` alone) at ``backend``."""
    if switch == "all":  # with no width fitting Triton, "auto" takes PyTorch
        norm_module.TRITON_MAX_FEATURES = TRITON_MAX_FEATURES if backend == "triton" else 0
    norm_lobes.single_group_norm = functools.partial(SINGLE_GROUP_NORM, backend=backend)


def compare_models(cases: str, rounds: int, switch: str) -> None:
    """Eager inference and training steps of whole models, the norm modules on each backend in turn."""
    device = torch.device("cuda")
    print(f"\nWhole models, median ms of {rounds} interleaved rounds (training: median of 5 steps), "
          "torch / triton (ratio)\n")
    print("| model | dtype | batch | inference 1 s, eager | inference 4 s, eager | training 4 s, eager "
          "| training 4 s, graphed |")
    print("|---|---|---|---|---|---|---|")
    for model, dtype, batch, net, num_spks in model_cases(cases, device):

        def measure(backend):
            use_backend(backend, switch)
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
    use_backend("triton", "all")
    norm_lobes.single_group_norm = SINGLE_GROUP_NORM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dpmamba_m:bf16:1,dpmamba_m:bf16:4", help="model:dtype:batch cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch", choices=["all", "group"], default="all",
                        help="the norms switched between backends in --models")
    parser.add_argument("--no-alone", action="store_true", help="skip the table of the norms alone")
    args = parser.parse_args()
    print(header(), flush=True)
    start = time.monotonic()
    if args.models:
        print(f"\nWhole models: norms switched: {args.switch}")
        compare_models(args.models, args.rounds, args.switch)
    if args.no_alone:
        return
    print("\nThe norms alone, GPU ms per call: forward / forward + backward\n")
    print("| norm | dtype | shape | torch | triton | triton / torch |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for kind, name, rows, features in SHAPES:
            results = time_norm(kind, (rows, features), dtype)
            (tf, tb), (rf, rb) = results["torch"], results["triton"]
            print(f"| {kind} | {str(dtype)[6:]} | {name} | {tf:.3f} / {tb:.3f} | {rf:.3f} / {rb:.3f} "
                  f"| {rf / tf:.2f} / {rb / tb:.2f} |", flush=True)
    print(f"\n({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
