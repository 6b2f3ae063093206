"""Inference with and without CUDA graphs (``MambaSeparator.use_cuda_graphs``), every model the same way.

For each model, length and dtype: the eager forward (as ``separation_models.py``
times it) and the same forward replayed from a CUDA graph captured for that
shape (:class:`speechbrain_mamba.inference.CUDAGraphCache`). Times are medians
of ``--repeats`` calls after the warm-up (which captures). "graph MiB" is the
memory the captured graph keeps between calls: the peak of one forward, held.

Usage (from the repository root)::

    python benchmarks/cuda_graphs.py --models dpmamba_m,sepformer,dprnn --lengths 1,4,16 \
        --out benchmarks/results/cuda_graphs

Writes ``<out>/cuda_graphs.md`` and ``<out>/cuda_graphs.json``.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_utils  # noqa: E402

from speechbrain_mamba.inference import CUDAGraphCache  # noqa: E402
from speechbrain_mamba.separation.separator import separate_mixture  # noqa: E402


def measure(modules, num_spks: int, seconds: float, dtype: str, repeats: int) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dpmamba_m,sepformer,dprnn,sepmamba_m")
    parser.add_argument("--lengths", default="1,4,16", help="seconds, comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=bench_utils.RESULTS_DIR / "cuda_graphs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA device.")

    rows = []
    for name in args.models.split(","):
        hparams_file = bench_utils.HPARAMS_DIR / f"{name}.yaml"
        if not hparams_file.is_file():
            raise SystemExit(f"--models: {hparams_file} does not exist")
        modules, num_spks, _ = bench_utils.load_model(hparams_file, torch.device("cuda"))
        for seconds in (float(s) for s in args.lengths.split(",")):
            for dtype in args.dtypes.split(","):
                row = dict(model=name, **measure(modules, num_spks, seconds, dtype, args.repeats))
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del modules
        torch.cuda.empty_cache()

    lines = [
        "# Inference with and without CUDA graphs",
        "",
        f"Machine: {bench_utils.machine_description(device=torch.device('cuda'))}. "
        f"Scan backend: {bench_utils.scan_backend(torch.device('cuda'))}. {bench_utils.tf32_flags()}.",
        f"Command: `python benchmarks/cuda_graphs.py {' '.join(sys.argv[1:])}`. Batch 1; median of "
        f"{args.repeats} calls; graph MiB = memory the captured graph keeps between calls.",
        "",
        "| model | length | dtype | eager ms | eager peak MiB | graph ms | graph MiB | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['seconds']:g} s | {r['dtype']} | {r['eager_ms']} | {r['eager_peak_MiB']} | "
        + (f"{r['graph_ms']} | {r['graph_MiB']} | {r['speedup']}x |" if r["graph_ms"] is not None
           else f"capture failed: {r['capture_error']} | | |")
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_graphs.md").write_text("\n".join(lines) + "\n")
    (args.out / "cuda_graphs.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
