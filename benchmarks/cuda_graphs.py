"""Inference and training steps with and without CUDA graphs, every model the same way.

Inference (``--kinds infer``): for each model, length and dtype, the eager
forward (as ``separation_models.py`` times it) and the same forward replayed
from a CUDA graph captured for that shape
(:class:`~speechbrain_mamba.utils.cuda_graphs.CUDAGraphCache`, what
``MambaSeparator.use_cuda_graphs`` uses). "graph MiB" is the memory the
captured graph keeps between calls: the peak of one forward, held.

Training (``--kinds train``): for each model, dtype and batch, the training
step of ``separation_models.py`` (forward, PIT SI-SNR, backward, Adam) eager,
then with its forward and backward replayed from CUDA graphs
(:class:`~speechbrain_mamba.utils.cuda_graphs.TrainingCUDAGraphs`, what the
Brain's ``cuda_graphs: True`` uses). Memory: the eager peak allocated above
the weights and optimizer state (the protocol of ``separation_models.py``),
and for both ways the peak *reserved* memory above what was reserved before the
step (after emptying the cache): a graph keeps its step's memory in a private
pool, which only the reserved memory shows.

Times are medians of ``--repeats`` calls after the warm-up (which captures).

Usage (from the repository root)::

    python benchmarks/cuda_graphs.py --models dpmamba_m,sepformer,dprnn --lengths 1,4,16 \
        --out benchmarks/results/cuda_graphs
    python benchmarks/cuda_graphs.py --kinds train --models dpmamba_m,sepmamba_m,sepformer --batches 1,4

A model may carry YAML overrides: ``dpmamba_m:checkpoint_blocks=True``.
Writes ``<out>/cuda_graphs.md`` and ``<out>/cuda_graphs.json``.
"""

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_utils  # noqa: E402

from speechbrain_mamba.separation.separator import SeparationForward, separate_mixture  # noqa: E402
from speechbrain_mamba.utils.cuda_graphs import CUDAGraphCache, TrainingCUDAGraphs  # noqa: E402

MIB = 2**20


def measure_inference(modules, num_spks: int, seconds: float, dtype: str, repeats: int) -> dict:
    """Eager and graphed inference of one random mixture."""
    device = torch.device("cuda")
    mixture, _ = bench_utils.random_batch(1, int(seconds * bench_utils.SAMPLE_RATE), num_spks, device)
    eager_times, eager_peak = bench_utils.time_and_memory(
        bench_utils.inference_step(modules, num_spks, mixture, dtype), device, warmup=1, repeats=repeats
    )
    graphed = CUDAGraphCache(lambda mix: separate_mixture(modules, mix, num_spks), max_graphs=1)

    def graphed_step() -> None:
        with torch.inference_mode(), bench_utils.autocast(device, dtype):
            graphed(mixture)

    before = torch.cuda.memory_allocated()
    graphed_step()  # warm-up and capture
    if graphed.capture_error is not None:  # e.g. a host-to-device copy inside the forward
        return dict(seconds=seconds, dtype=dtype, eager_ms=round(bench_utils.median(eager_times), 2),
                    eager_peak_MiB=round(eager_peak, 1), graph_ms=None, graph_MiB=None, speedup=None,
                    capture_error=graphed.capture_error[:160])
    held = (torch.cuda.memory_allocated() - before) / 2**20
    graph_times, _ = bench_utils.time_and_memory(graphed_step, device, warmup=1, repeats=repeats)
    graphed.clear()
    torch.cuda.empty_cache()
    eager, graph = bench_utils.median(eager_times), bench_utils.median(graph_times)
    return dict(seconds=seconds, dtype=dtype, eager_ms=round(eager, 2), eager_peak_MiB=round(eager_peak, 1),
                graph_ms=round(graph, 2), graph_MiB=round(held, 1), speedup=round(eager / graph, 2))


def _reserved_peak(step, since: Optional[int] = None) -> float:
    """MiB of peak reserved memory during one ``step()`` (cache emptied first) above ``since`` bytes (default:
    what is reserved before the step)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved() if since is None else since
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_reserved() - before) / MIB


def measure_training(modules, num_spks: int, seconds: float, batch: int, dtype: str, repeats: int) -> dict:
    """Eager and graphed training steps on one random batch."""
    device = torch.device("cuda")
    mixture, sources = bench_utils.random_batch(batch, int(seconds * bench_utils.SAMPLE_RATE), num_spks, device)
    optimizer = torch.optim.Adam(modules.parameters(), lr=1.5e-4)
    eager = bench_utils.training_step(modules, num_spks, mixture, sources, dtype, optimizer)
    eager_times, eager_peak = bench_utils.time_and_memory(eager, device, warmup=1, repeats=repeats)
    row = dict(seconds=seconds, batch=batch, dtype=dtype, eager_ms=round(bench_utils.median(eager_times), 2),
               eager_peak_MiB=round(eager_peak, 1), eager_reserved_MiB=round(_reserved_peak(eager), 1))
    graphed = TrainingCUDAGraphs(SeparationForward(modules, num_spks), max_graphs=1, min_calls=1)
    step = bench_utils.training_step(modules, num_spks, mixture, sources, dtype, optimizer, forward=graphed)
    gc.collect()
    torch.cuda.empty_cache()
    before_capture = torch.cuda.memory_reserved()
    try:
        step()  # warm-up and capture
    except RuntimeError as error:  # e.g. the stock Dual_Path_Model's host-to-device copy
        return dict(row, graph_ms=None, graph_reserved_MiB=None, speedup=None,
                    capture_error=str(error.__cause__ or error).splitlines()[0][:160])
    # The graphs' private pool stays reserved: counted from before the capture (the warm-up's cache emptied).
    graph_reserved = _reserved_peak(step, since=before_capture)
    graph_times, _ = bench_utils.time_and_memory(step, device, warmup=1, repeats=repeats)
    del graphed, step
    gc.collect()
    torch.cuda.empty_cache()
    graph = bench_utils.median(graph_times)
    return dict(row, graph_ms=round(graph, 2), graph_reserved_MiB=round(graph_reserved, 1),
                speedup=round(row["eager_ms"] / graph, 2))


def report(args: argparse.Namespace, rows: list) -> str:
    """The markdown tables of the rows measured."""
    lines = [
        "# Separation with and without CUDA graphs",
        "",
        f"Machine: {bench_utils.machine_description(device=torch.device('cuda'))}. "
        f"Scan backend: {bench_utils.scan_backend(torch.device('cuda'))}. {bench_utils.tf32_flags()}.",
        f"Command: `python benchmarks/cuda_graphs.py {' '.join(sys.argv[1:])}`. Median of {args.repeats} calls.",
    ]
    infer = [r for r in rows if r["kind"] == "infer"]
    if infer:
        lines += [
            "", "## Inference, batch 1", "",
            "graph MiB = memory the captured graph keeps between calls.", "",
            "| model | length | dtype | eager ms | eager peak MiB | graph ms | graph MiB | speed-up |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['seconds']:g} s | {r['dtype']} | {r['eager_ms']} | {r['eager_peak_MiB']} | "
            + (f"{r['graph_ms']} | {r['graph_MiB']} | {r['speedup']}x |" if r["graph_ms"] is not None
               else f"capture failed: {r['capture_error']} | | |")
            for r in infer
        ]
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        lines += [
            "", "## Training step (forward + PIT SI-SNR + backward + Adam)", "",
            "eager peak = peak allocated above the weights and optimizer state (separation_models.py's measure); "
            "reserved = peak reserved above what was reserved before the step (graphed: before the capture), "
            "the graph's private pool included.", "",
            "| model | length | batch | dtype | eager ms | eager peak MiB | eager reserved MiB | graph ms | "
            "graph reserved MiB | speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['seconds']:g} s | {r['batch']} | {r['dtype']} | {r['eager_ms']} | "
            f"{r['eager_peak_MiB']} | {r['eager_reserved_MiB']} | "
            + (f"{r['graph_ms']} | {r['graph_reserved_MiB']} | {r['speedup']}x |" if r["graph_ms"] is not None
               else f"capture failed: {r['capture_error']} | | |")
            for r in train
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dpmamba_m,sepformer,dprnn,sepmamba_m",
                        help="hparams/ stems, comma-separated, each optionally with :key=value overrides")
    parser.add_argument("--kinds", default="infer", help="infer and/or train, comma-separated")
    parser.add_argument("--lengths", default="1,4,16", help="inference lengths in seconds, comma-separated")
    parser.add_argument("--train-seconds", type=float, default=4.0, help="training segment length in seconds")
    parser.add_argument("--batches", default="1,4", help="training batch sizes, comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=bench_utils.RESULTS_DIR / "cuda_graphs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA device.")
    kinds = args.kinds.split(",")
    if not set(kinds) <= {"infer", "train"}:
        raise SystemExit(f"--kinds: expected infer and/or train, got {args.kinds!r}")

    rows = []
    for name in args.models.split(","):
        stem, overrides = bench_utils.parse_model(name)
        hparams_file = bench_utils.HPARAMS_DIR / f"{stem}.yaml"
        if not hparams_file.is_file():
            raise SystemExit(f"--models: {hparams_file} does not exist")
        modules, num_spks, _ = bench_utils.load_model(hparams_file, torch.device("cuda"), overrides)
        settings = []
        if "infer" in kinds:
            settings += [("infer", float(s), 1, d) for s in args.lengths.split(",") for d in args.dtypes.split(",")]
        if "train" in kinds:
            settings += [("train", args.train_seconds, int(b), d) for d in args.dtypes.split(",")
                         for b in args.batches.split(",")]
        for kind, seconds, batch, dtype in settings:
            try:
                if kind == "infer":
                    result = measure_inference(modules, num_spks, seconds, dtype, args.repeats)
                else:
                    result = measure_training(modules, num_spks, seconds, batch, dtype, args.repeats)
            except torch.cuda.OutOfMemoryError:
                result = dict(seconds=seconds, batch=batch, dtype=dtype, eager_ms=None, eager_peak_MiB=None,
                              eager_reserved_MiB=None, graph_ms=None, capture_error="out of memory")
                gc.collect()
                torch.cuda.empty_cache()
            row = dict(model=name, kind=kind, **result)
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)  # written after every row: a cut run keeps its rows
            (args.out / "cuda_graphs.md").write_text(report(args, rows))
            (args.out / "cuda_graphs.json").write_text(json.dumps(rows, indent=1))
        del modules
        gc.collect()
        torch.cuda.empty_cache()
    print(report(args, rows))


if __name__ == "__main__":
    main()
