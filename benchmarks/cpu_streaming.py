"""CPU benchmark: chunk-by-chunk streaming of the causal SepMamba S and M (SepMambaStreamer).

For each model, thread count and chunk size, a few seconds of noise at 8 kHz are
fed chunk by chunk after a warm-up; reported per chunk: median and
95th-percentile wall time, the real-time factor (processing time / audio time,
below 1 keeps up) and the share of chunks processed within their own duration.
fp32, no gradients, batch 1. Weights are the random initialisation: the cost
does not depend on them. Latency of a streamed output sample = chunk buffering
+ the model's look-ahead (105 samples, 13.125 ms) + the chunk's processing time.

Usage: python benchmarks/cpu_streaming.py [--threads 2 1] [--chunks-ms 10 20 40] [--seconds 3]
       [--output benchmarks/results/cpu_streaming.md]
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_mamba.lobes import SepMambaStreamer

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 8000
MODELS = {"causal S": "sepmamba_causal_s", "causal M": "sepmamba_causal_m"}


def load_model(name: str) -> torch.nn.Module:
    with open(REPO_ROOT / "hparams" / f"{name}.yaml") as handle:
        return load_hyperpyyaml(handle)["modules"]["model"].eval()


def measure(model: torch.nn.Module, chunk: int, seconds: float, warmup_seconds: float) -> Dict[str, float]:
    """Streams noise through the model; per-chunk times in ms."""
    streamer = SepMambaStreamer(model)
    generator = torch.Generator().manual_seed(0)
    for piece in torch.randn(1, int(warmup_seconds * SAMPLE_RATE), generator=generator).split(chunk, -1):
        streamer(piece)
    times = []
    for piece in torch.randn(1, int(seconds * SAMPLE_RATE), generator=generator).split(chunk, -1):
        start = time.perf_counter()
        streamer(piece)
        times.append(1e3 * (time.perf_counter() - start))
    chunk_ms = 1e3 * chunk / SAMPLE_RATE
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        "rtf": sum(times) / (len(times) * chunk_ms),
        "in_time": sum(t <= chunk_ms for t in times) / len(times),
    }


def offline_rtf(model: torch.nn.Module, seconds: float) -> float:
    """Processing time / audio time of one offline forward of the whole signal (after a warm-up run)."""
    mixture = torch.randn(1, int(seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(0))
    model(mixture)
    start = time.perf_counter()
    model(mixture)
    return (time.perf_counter() - start) / seconds


def machine_lines() -> List[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"CPU: {cpu}, {os.cpu_count()} logical cores; fp32",
        f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        f"Load average (1/5/15 min) at the start: {load}. On a shared machine the timings are noisy: "
        "rerun on an idle one for reference numbers.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--chunks-ms", type=float, nargs="+", default=[10, 20, 40])
    parser.add_argument("--seconds", type=float, default=3.0, help="audio streamed per measurement")
    parser.add_argument("--warmup-seconds", type=float, default=0.5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cpu_streaming.md")
    args = parser.parse_args()

    header = machine_lines()
    print("\n".join(header))
    rows = [
        "| model | params | threads | chunk (ms) | median (ms) | p95 (ms) | RTF | chunks in time | latency (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        for label in args.models:
            model = load_model(MODELS[label])
            params = sum(p.numel() for p in model.parameters()) / 1e6
            for threads in args.threads:
                torch.set_num_threads(threads)
                for chunk_ms in args.chunks_ms:
                    chunk = round(chunk_ms * SAMPLE_RATE / 1000)
                    result = measure(model, chunk, args.seconds, args.warmup_seconds)
                    # Worst case for a sample: it waits a whole chunk, the look-ahead, then the processing.
                    latency = chunk_ms + 1e3 * model.lookahead / SAMPLE_RATE + result["p95_ms"]
                    rows.append(
                        f"| {label} | {params:.3f}M | {threads} | {chunk_ms:g} | {result['median_ms']:.2f} "
                        f"| {result['p95_ms']:.2f} | {result['rtf']:.2f} | {100 * result['in_time']:.0f} % "
                        f"| {latency:.1f} |"
                    )
                    print(rows[-1], flush=True)
                rows.append(
                    f"| {label} | {params:.3f}M | {threads} | offline | | | "
                    f"{offline_rtf(model, args.seconds):.2f} | | |"
                )
                print(rows[-1], flush=True)

    lines = [
        "# Streaming causal SepMamba on the CPU (`benchmarks/cpu_streaming.py`)",
        "",
        *[f"- {line}" for line in header],
        f"- {args.seconds:g} s of noise per row after {args.warmup_seconds:g} s of warm-up; batch 1; "
        "per-chunk wall time of `SepMambaStreamer.__call__`.",
        "- RTF: processing time / audio time (< 1 keeps up with real time). Latency: chunk + look-ahead "
        "(105 samples = 13.125 ms) + p95 processing time, the worst wait of an output sample.",
        "- `offline`: one forward of the whole signal, for reference (the model's own cost on this CPU).",
        "",
        *rows,
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(f"Written to {args.output}")


if __name__ == "__main__":
    main()
