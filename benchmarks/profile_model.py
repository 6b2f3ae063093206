"""Where a separation model's time goes: torch.profiler tables per kernel and per kind.

For each requested case (inference or training step, length, dtype, batch)
the script times the step (median of ``--repeats``), then profiles one more
call and writes, to ``<out>/profile.md``:

- wall time, the GPU's busy time (sum of kernel times) and the number of
  kernels launched: when busy time is far below wall time, the step is bound
  by the host launching kernels, not by the GPU;
- the time per kind of kernel (selective scan, matmul, norm, convolution,
  elementwise, copies) and the top kernels by total time.

On the CPU the table lists the top operators by self CPU time instead.

Usage (from the repository root)::

    python benchmarks/profile_model.py --device cuda --model dpmamba_m \
        --cases infer:fp32:60,infer:fp32:1,train:bf16:4 --out benchmarks/results/profile_dpmamba_m
"""

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils  # noqa: E402

# Kernel name patterns -> kind, first match wins.
KINDS = [
    ("selective scan", r"_scan_|selective_scan"),
    ("matmul", r"gemm|sm90_|cutlass|cublas|matmul|_mm_|splitK"),
    ("norm (reductions)", r"reduce|norm|var_mean|welford|softmax"),
    ("convolution", r"conv|depthwise|implicit|winograd|fft"),
    ("copy / layout", r"copy|transpose|cat|pad|flip|index|gather|scatter|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton_"),
]


def kind_of(name: str) -> str:
    """The kind a kernel name falls under (``other`` if none)."""
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def kernel_totals(prof: profile) -> Tuple[List[Tuple[str, int, float]], float, int]:
    """(name, count, total ms) per GPU kernel, busy ms, number of kernels.

    User annotations (``Optimizer.step#Adam.step``) also appear on the GPU's
    timeline; they span kernels already counted, so they are left out.
    """
    totals: Dict[str, List[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us() / 1e3
    rows = sorted(((name, int(count), ms) for name, (count, ms) in totals.items()), key=lambda row: -row[2])
    return rows, sum(row[2] for row in rows), sum(row[1] for row in rows)


def kernel_ms_per_call(fn, calls: int = 20) -> float:
    """GPU time per call of ``fn``: its kernels' total time under the profiler (short calls timed from the host
    would measure the host)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_totals(prof)[1] / calls


def operator_device_totals(prof: profile) -> List[Tuple[str, int, float]]:
    """(operator, count, GPU ms of the kernels it launched itself), largest first."""
    rows = [(e.key, e.count, e.self_device_time_total / 1e3) for e in prof.key_averages()
            if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    return sorted(rows, key=lambda row: -row[2])


def cpu_totals(prof: profile) -> List[Tuple[str, int, float]]:
    """(operator, count, self CPU ms), largest first."""
    rows = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    return sorted(rows, key=lambda row: -row[2])


def make_step(modules, num_spks, case: Dict[str, object], device: torch.device):
    """The step callable of a case, and the optimizer it keeps alive (or None)."""
    samples = int(float(case["seconds"]) * bench_utils.SAMPLE_RATE)
    mixture, sources = bench_utils.random_batch(int(case["batch"]), samples, num_spks, device)
    if case["kind"] == "infer":
        return bench_utils.inference_step(modules, num_spks, mixture, case["dtype"])
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-4)
    return bench_utils.training_step(modules, num_spks, mixture, sources, case["dtype"], optimizer)


def profile_case(modules, num_spks, case: Dict[str, object], device: torch.device, repeats: int,
                 top: int) -> List[str]:
    """Markdown lines for one case."""
    step = make_step(modules, num_spks, case, device)
    times, peak = bench_utils.time_and_memory(step, device, warmup=1, repeats=repeats)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        bench_utils.synchronize(device)
    wall = bench_utils.median(times)
    title = f"{case['kind']} {case['dtype']} {case['seconds']} s, batch {case['batch']}"
    memory = "" if peak is None else f", peak {peak:.0f} MiB"
    lines = [f"## {title}", "", f"Wall {wall:.1f} ms (median of {len(times)}){memory}."]
    if device.type != "cuda":
        lines += ["", "| operator | calls | self CPU ms |", "|---|---|---|"]
        lines += [f"| `{name[:90]}` | {count} | {ms:.2f} |" for name, count, ms in cpu_totals(prof)[:top]]
        return lines + [""]
    rows, busy, launches = kernel_totals(prof)
    lines[-1] += (
        f" GPU busy {busy:.1f} ms ({100 * busy / wall:.0f} % of wall) in {launches} kernels"
        f" ({1e3 * wall / max(launches, 1):.1f} us of wall per kernel)."
    )
    by_kind: Dict[str, List[float]] = {}
    for name, count, ms in rows:
        entry = by_kind.setdefault(kind_of(name), [0, 0.0])
        entry[0] += count
        entry[1] += ms
    lines += ["", "| kind | kernels | GPU ms | share of busy |", "|---|---|---|---|"]
    for kind, (count, ms) in sorted(by_kind.items(), key=lambda item: -item[1][1]):
        lines.append(f"| {kind} | {count} | {ms:.2f} | {100 * ms / busy:.0f} % |")
    lines += ["", "| kernel | kind | calls | GPU ms |", "|---|---|---|---|"]
    lines += [f"| `{name[:90]}` | {kind_of(name)} | {count} | {ms:.2f} |" for name, count, ms in rows[:top]]
    lines += ["", "| operator (or autograd node) | calls | GPU ms of its own kernels |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {count} | {ms:.2f} |" for name, count, ms in operator_device_totals(prof)[:top]]
    return lines + [""]


def parse_case(text: str) -> Dict[str, object]:
    """``kind:dtype:seconds[:batch]``, e.g. ``train:bf16:4:4``."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("infer", "train") or parts[1] not in bench_utils.DTYPES:
        raise SystemExit(f"--cases: {text!r} is not kind:dtype:seconds[:batch] (kind infer|train, dtype fp32|bf16)")
    return {"kind": parts[0], "dtype": parts[1], "seconds": float(parts[2]),
            "batch": int(parts[3]) if len(parts) == 4 else 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="dpmamba_m", help="a file of hparams/ without .yaml")
    parser.add_argument("--cases", default="infer:fp32:60,infer:fp32:1,train:bf16:4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    hparams_file = bench_utils.HPARAMS_DIR / f"{args.model}.yaml"
    if not hparams_file.is_file():
        raise SystemExit(f"--model: {hparams_file} does not exist")
    cases = [parse_case(text) for text in args.cases.split(",")]
    device = torch.device(args.device)
    modules, num_spks, _ = bench_utils.load_model(hparams_file, device)
    lines = [
        f"# Profile of {args.model}",
        "",
        f"Machine: {bench_utils.machine_description(torch.get_num_threads(), device)}. "
        f"Scan backend: {bench_utils.scan_backend(device)}. {bench_utils.tf32_flags()}.",
        f"Command: `python benchmarks/profile_model.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        lines += profile_case(modules, num_spks, case, device, args.repeats, args.top)
        print("\n".join(lines[-8:]), flush=True)
        (args.out / "profile.md").write_text("\n".join(lines))  # after each case: a cut-off run keeps them
    print(f"wrote {args.out / 'profile.md'}")


if __name__ == "__main__":
    main()
