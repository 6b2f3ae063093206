"""What is alive at a separation's peak GPU memory, by the source line that allocated it.

Runs one inference (batch 1, ``torch.inference_mode``) or one training step (forward + PIT SI-SNR +
backward + Adam, as ``separation_models.py``) after a warm-up call, with PyTorch's allocator history
recording Python stacks. Replaying the history's allocations and frees gives the allocated bytes after
every event; at their maximum, the live blocks are grouped by the innermost frame in this package
(else in SpeechBrain, else the innermost frame). Blocks alive before the call (weights, optimizer state)
are not counted, as in ``separation_models.py``'s peak.

Usage (GPU)::

    python benchmarks/memory_peak.py --models sepmamba_m --cases infer:fp32:4,infer:fp32:60,train:bf16:4 \\
        --out benchmarks/results/<folder>/memory_peak.md
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from bench_utils import (
    HPARAMS_DIR,
    SAMPLE_RATE,
    inference_step,
    load_model,
    machine_description,
    parse_model,
    random_batch,
    training_step,
)

MIB = 2**20


def _origin(frames: List[dict]) -> str:
    """Where a block was allocated: the innermost frame in this package, else in SpeechBrain, else any."""
    for marker in ("speechbrain_mamba", "speechbrain"):
        for frame in frames:
            if marker in frame["filename"] and "memory_peak" not in frame["filename"]:
                path = frame["filename"].split(marker, 1)[1].lstrip("/")
                return f"{marker}/{path}:{frame['line']} ({frame['name']})"
    return f"{frames[0]['filename']}:{frames[0]['line']} ({frames[0]['name']})" if frames else "(no stack)"


def peak_composition(trace: List[dict]) -> Tuple[int, Dict[str, Tuple[int, int]]]:
    """(peak bytes, {origin: (bytes, blocks)} alive at the peak) from an allocator trace."""
    live: Dict[int, dict] = {}
    total = peak = peak_index = 0
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, peak_index = total, index
    live = {}
    for event in trace[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        group = groups[_origin(event["frames"])]
        group[0] += event["size"]
        group[1] += 1
    return peak, {origin: (size, count) for origin, (size, count) in groups.items()}


def measure(model: str, kind: str, dtype: str, seconds: float, batch: int, device: torch.device) -> str:
    stem, overrides = parse_model(model)
    modules, num_spks, _ = load_model(HPARAMS_DIR / f"{stem}.yaml", device, overrides)
    mixture, sources = random_batch(batch, int(seconds * SAMPLE_RATE), num_spks, device)
    if kind == "infer":
        step = inference_step(modules, num_spks, mixture, dtype)
    else:
        optimizer = torch.optim.Adam(modules.parameters(), lr=1e-4)
        step = training_step(modules, num_spks, mixture, sources, dtype, optimizer)
    step()  # warm-up: kernels compiled, optimizer state made
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    step()
    torch.cuda.synchronize(device)
    trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    torch.cuda.memory._record_memory_history(enabled=None)
    allocator_peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    peak, groups = peak_composition(trace)
    lines = [f"## {model}, {kind}, {dtype}, {seconds:g} s, batch {batch}", "",
             f"Peak {peak / MIB:.0f} MiB from the trace ({allocator_peak:.0f} MiB by max_memory_allocated), "
             f"{sum(count for _, count in groups.values())} blocks alive at it:", "",
             "| allocated at | MiB | blocks |", "|---|---|---|"]
    for origin, (size, count) in sorted(groups.items(), key=lambda item: -item[1][0]):
        if size >= MIB:
            lines.append(f"| `{origin}` | {size / MIB:.0f} | {count} |")
    del modules, step
    torch.cuda.empty_cache()
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sepmamba_m",
                        help="comma-separated hparams stems (variants: stem:key=value)")
    parser.add_argument("--cases", default="infer:fp32:4,infer:fp32:60,train:bf16:4",
                        help="comma-separated kind:dtype:seconds[:batch] (kind infer or train, dtype fp32 or bf16)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_peak.py reads the CUDA allocator's history: it needs a GPU.")
    device = torch.device("cuda")
    sections = [f"# Peak memory by allocation site\n\nMachine: {machine_description(device=device)}.\n"
                f"Command: `python benchmarks/memory_peak.py {' '.join(sys.argv[1:])}`\n"]
    for model in args.models.split(","):
        for case in args.cases.split(","):
            kind, dtype, seconds, *batch = case.split(":")
            section = measure(model, kind, dtype, float(seconds), int(batch[0]) if batch else 1, device)
            print(section, flush=True)
            sections.append(section)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
