"""The scan kernels of this checkout against a baseline copy of ``scan_triton.py``: forward and backward time.

Both modules run the same inputs (``gpu_scan_kernels.make_inputs``, channel-last as the Mamba mixer passes
them) on DPMamba-M's intra- and inter-chunk shapes (``scan_state_interval.SHAPES``) and SepMamba-M's three
stages at 4 s (``scan_split_experiment.SHAPES``), fp32 and bf16, each with its own default configs. The
forward pass and the backward pass alone (``scan_backward_ablation.times``, ``do_bench`` medians) are timed
in ``--rounds`` interleaved rounds, the order of the two modules flipped every round; the script prints the
median of the rounds and the ratio current / baseline.

With ``--train``, whole models' training steps on 4 s (``cuda_graphs.measure_training``: eager and
CUDA-graphed, median of 5 steps) are compared the same way, the ``triton`` scan backend pointing at one
module then the other.

Usage (from the repository root, on a GPU)::

    git show HEAD~1:speechbrain_mamba/ops/scan_triton.py > /tmp/scan_baseline.py
    python benchmarks/scan_ab.py --baseline /tmp/scan_baseline.py [--rounds 3] \
        [--train dpmamba_m:bf16:1,dpmamba_m:bf16:4,sepmamba_m:fp32:1] [--no-kernels]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_utils  # noqa: E402
from bench_utils import load_module  # noqa: E402
from cuda_graphs import measure_training  # noqa: E402
from gpu_scan_kernels import header, make_inputs  # noqa: E402
from scan_backward_ablation import times  # noqa: E402
from scan_split_experiment import SHAPES as SEPMAMBA_SHAPES  # noqa: E402
from scan_state_interval import SHAPES as DPMAMBA_SHAPES  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402
from speechbrain_mamba.ops.selective_scan import BACKENDS  # noqa: E402

SHAPES = DPMAMBA_SHAPES + [shape for shape in SEPMAMBA_SHAPES if shape[0].endswith("-4s")]


def interleaved(names: list, rounds: int, measure) -> dict:
    """``measure(name)`` for each name in each round, the order flipped every round: lists per name."""
    results = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else list(reversed(names)):
            results[name].append(measure(name))
    return results


def ratio_cell(measured: dict, key) -> str:
    """``first / second (ratio second / first)`` of the medians of ``key(result)``, for the two entries of
    ``measured`` in order (baseline then current)."""
    base, current = (statistics.median(key(result) for result in measured[name]) for name in measured)
    return f"{base:.3f} / {current:.3f} ({current / base:.2f})"


def model_cases(cases: str, device: torch.device) -> Iterator[tuple]:
    """``(model, dtype, batch, modules, num_spks)`` per ``model[:option=value]:dtype:batch`` case, each model
    built with random weights on ``device``."""
    for case in cases.split(","):
        model, dtype, batch = case.rsplit(":", 2)
        stem, overrides = bench_utils.parse_model(model)
        net, num_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / f"{stem}.yaml", device, overrides)
        yield model, dtype, int(batch), net, num_spks


def compare_kernels(modules: dict, rounds: int) -> None:
    """Forward and backward times of both modules on every shape and dtype."""
    print(f"\nMedian ms of {rounds} interleaved rounds (each round: do_bench median)\n")
    print("| dtype | shape | forward: baseline / current (ratio) | backward: baseline / current (ratio) |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for shape, batch, channels, length in SHAPES:
            inputs = make_inputs(batch, channels, length, dtype, False)
            measured = interleaved(list(modules), rounds,
                                   lambda name: times(modules[name], inputs, {}, time_forward=True))
            cells = [ratio_cell(measured, lambda result, kind=kind: result[kind]) for kind in (0, 1)]
            print(f"| {str(dtype)[6:]} | {shape} | " + " | ".join(cells) + " |", flush=True)


def use_scan(module) -> None:
    """Points the ``triton`` scan backend at ``module``'s kernels."""
    BACKENDS["triton"] = module.selective_scan_triton


def compare_training(modules: dict, cases: str, rounds: int, use=use_scan) -> None:
    """Eager and graphed training steps of whole models, ``use(module)`` pointing the package at each module
    in turn (the last one, the current module, stays in use)."""
    print(f"\nTraining step on 4 s, median ms of {rounds} interleaved rounds (each: median of 5 steps)\n")
    print("| model | dtype | batch | eager: baseline / current (ratio) | graphed: baseline / current (ratio) |")
    print("|---|---|---|---|---|")
    for model, dtype, batch, net, num_spks in model_cases(cases, torch.device("cuda")):

        def measure(name):
            use(modules[name])
            return measure_training(net, num_spks, 4.0, batch, dtype, 5)

        measured = interleaved(list(modules), rounds, measure)
        use(modules[list(modules)[-1]])
        cells = [ratio_cell(measured, lambda row, key=key: row[key]) for key in ("eager_ms", "graph_ms")]
        print(f"| {model} | {dtype} | {batch} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="path of a copy of scan_triton.py to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    parser.add_argument("--train", default="", help="model:dtype:batch cases of whole training steps")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernels alone")
    args = parser.parse_args()
    modules = {"baseline": load_module(args.baseline), "current": scan_triton}
    print(header(), flush=True)
    start = time.monotonic()
    if not args.no_kernels:
        compare_kernels(modules, args.rounds)
    if args.train:
        compare_training(modules, args.train, args.rounds)
    print(f"\n({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
