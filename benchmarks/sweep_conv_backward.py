"""Tile sweep of the causal depthwise convolution's backward kernel, against an earlier copy of the module.

Times ``_backward`` of ``speechbrain_mamba/ops/causal_conv_triton.py`` (``dx``, ``dw``, ``db``; the sums of
the weight partials included) with ``triton.testing.do_bench`` (median), for each ``ConvConfig`` of
``--configs``, on DPMamba-M's and SepMamba-M's shapes (``x`` a strided half of an ``in_proj`` output, as the
mixer passes it; kernel size 4), next to the forward kernel and, at each tile, the same module of
``--baseline``, a copy from another commit (e.g. ``git show REV:speechbrain_mamba/ops/causal_conv_triton.py``).
Prints a markdown table; numbers only, nothing is checked. With ``--train`` (and ``--baseline``), whole
models' training steps on 4 s, eager and CUDA-graphed, the convolution on the baseline module then on this one
in interleaved rounds (``scan_ab.compare_training``).

Usage (GPU)::

    python benchmarks/sweep_conv_backward.py --baseline /tmp/causal_conv_triton_before.py \
        [--configs 16x32x1] [--train dpmamba_m:bf16:1,dpmamba_m:bf16:4] [--rounds 3]
"""

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import load_module  # noqa: E402
from scan_ab import compare_training  # noqa: E402
from speechbrain_mamba.ops import causal_conv, causal_conv_triton  # noqa: E402

# name, sequences, frames, channels (the Mamba mixer's E)
SHAPES = [("dpmamba_m intra 4 s x4", 132, 250, 512), ("dpmamba_m inter 4 s x4", 1000, 33, 512),
          ("dpmamba_m intra 60 s", 481, 250, 512), ("sepmamba_m stage 1 4 s", 1, 15993, 256),
          ("sepmamba_m stage 3 4 s", 1, 3987, 1024)]


def backward_ms(module: ModuleType, x, weight, bias, dout, config) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: module._backward(x, weight, bias, dout, False, True, True, config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="an earlier causal_conv_triton.py to time beside this one")
    parser.add_argument("--configs", default="32x64x2,16x64x2,32x64x4,16x128x4,32x32x1,64x64x4",
                        help="block_l x block_e x num_warps, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--train", default="", help="model:dtype:batch cases of training steps (needs --baseline)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --train; the median is printed")
    args = parser.parse_args()
    configs = [causal_conv_triton.ConvConfig(*map(int, text.split("x"))) for text in args.configs.split(",")]
    baseline: Optional[ModuleType] = load_module(args.baseline) if args.baseline else None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}; backward ms (do_bench median); default backward config "
          f"{causal_conv_triton.BACKWARD_CONFIG}")
    modules = [("before", baseline), ("now", causal_conv_triton)] if baseline else [("now", causal_conv_triton)]
    header: List[str] = ["dtype", "shape", "forward"]
    header += [f"{label} {c.block_l}x{c.block_e}x{c.num_warps}" for c in configs for label, _ in modules]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for dtype_name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        for name, sequences, frames, channels in SHAPES:
            xz = torch.randn(sequences, frames, 2 * channels, device="cuda", dtype=dtype)
            x = xz[..., :channels]
            weight = torch.randn(channels, 4, device="cuda") * 0.5
            bias = torch.randn(channels, device="cuda") * 0.1
            dout = torch.randn(sequences, frames, channels, device="cuda", dtype=dtype)
            import triton.testing

            forward = triton.testing.do_bench(lambda: causal_conv_triton._forward(
                x, weight, bias, False, causal_conv_triton.FORWARD_CONFIG))
            row = [dtype_name, name, f"{forward:.3f}"]
            row += [f"{backward_ms(module, x, weight, bias, dout, c):.3f}" for c in configs for _, module in modules]
            print("| " + " | ".join(row) + " |", flush=True)
    if args.train and baseline is not None:
        def use(module: ModuleType) -> None:
            causal_conv.load_triton_conv = lambda: module.causal_conv1d_silu_triton

        compare_training({"baseline": baseline, "current": causal_conv_triton}, args.train, args.rounds, use)


if __name__ == "__main__":
    main()
