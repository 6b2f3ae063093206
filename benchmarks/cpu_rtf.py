"""CPU real-time factor of separation, and the training-step time of the demo configuration.

Real-time factor (RTF) = processing time / audio duration, for separating
mixtures of ``--lengths`` seconds at 8 kHz, batch 1, fp32, under
``torch.inference_mode()``, with ``--threads`` threads (docs/benchmarks.md).
Each model runs in a fresh process (its peak memory is its own): built from
``hparams/<model>.yaml`` with random weights, one warm-up separation of a 1 s
mixture, then per length the median of ``--repeats`` separations and the peak
resident memory above the built model. The demo configuration's training step
(recipes/WSJ0Mix/separation/hparams/dpmamba_xs.yaml with the demo overrides of
speechbrain_mamba/separation/recipe.py: segment length, batch size, fp32) is
timed the same way: forward + PIT SI-SNR + backward + the recipe's optimizer
step, without the Brain's bookkeeping. Like the recipe, every process makes
glibc keep freed memory (``--allocator keep-freed``; see
speechbrain_mamba/utils/cpu.py) unless ``--allocator default``.

Writes a markdown table (default benchmarks/results/cpu_rtf.md) with the
issue-5 targets: RTF DPMamba-M <= 0.5, DPMamba-XS <= 0.1, SepMamba-M <= 0.3.

``--profile MODEL`` instead prints torch.profiler's top operators of one
inference of ``--profile-seconds`` seconds (CPU hot spots).

Usage: python benchmarks/cpu_rtf.py [--threads 2] [--repeats 3]
       python benchmarks/cpu_rtf.py --profile dpmamba_xs --profile-seconds 4
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from bench_utils import (
    HPARAMS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    SAMPLE_RATE,
    count_parameters,
    inference_step,
    load_model,
    machine_description,
    median,
    random_batch,
    reset_peak_rss,
    status_kib,
    time_and_memory,
    training_step,
)

MODELS = ("dpmamba_xs", "dpmamba_m", "sepmamba_m", "sepformer", "dprnn")
TARGETS = {"dpmamba_xs": 0.1, "dpmamba_m": 0.5, "sepmamba_m": 0.3}
REFERENCE = "kernels.md (same kind of machine): Sepformer RTF 2.76 at 10 s and 3.86 at 60 s, DPRNN 1.28 at both"
DEMO_RECIPE = REPO_ROOT / "recipes" / "WSJ0Mix" / "separation" / "hparams" / "dpmamba_xs.yaml"
DEMO_TRAIN = "demo-train"  # the child job that times the demo configuration's training step
CPU = torch.device("cpu")


def set_up_process(threads: int, allocator: str) -> None:
    """Thread count and allocator of a measuring process."""
    torch.set_num_threads(threads)
    if allocator == "keep-freed":
        from speechbrain_mamba.utils.cpu import keep_freed_memory

        keep_freed_memory()


def measure_model(model: str, lengths: List[float], repeats: int) -> dict:
    """In the child: RTF of separating each length, and the peak RSS above the built model."""
    modules, num_spks, _ = load_model(HPARAMS_DIR / f"{model}.yaml", CPU)
    baseline = reset_peak_rss()
    warm_mixture, _ = random_batch(1, SAMPLE_RATE, num_spks, CPU)
    inference_step(modules, num_spks, warm_mixture, "fp32")()
    result = {"params": count_parameters(modules), "lengths": {}}
    for seconds in sorted(lengths):  # increasing: the peak so far is the current length's
        mixture, _ = random_batch(1, round(seconds * SAMPLE_RATE), num_spks, CPU)
        times, _ = time_and_memory(inference_step(modules, num_spks, mixture, "fp32"), CPU, 0, repeats)
        result["lengths"][str(seconds)] = {
            "times_ms": times,
            "rtf": median(times) / 1e3 / seconds,
            "peak_rss_mib": (status_kib("VmHWM") - baseline) / 1024,
        }
    return result


def measure_demo_training(repeats: int) -> dict:
    """In the child: one training step of the demo configuration."""
    from speechbrain_mamba.separation.recipe import DEMO_OVERRIDES

    with tempfile.TemporaryDirectory() as output_folder:  # the recipe file creates folders there
        modules, num_spks, hparams = load_model(
            DEMO_RECIPE, CPU, {**DEMO_OVERRIDES, "output_folder": output_folder}
        )
    batch, samples = int(hparams["batch_size"]), int(hparams["training_signal_len"])
    mixture, sources = random_batch(batch, samples, num_spks, CPU)
    optimizer = hparams["optimizer"](modules.parameters())
    baseline = reset_peak_rss()
    times, _ = time_and_memory(training_step(modules, num_spks, mixture, sources, "fp32", optimizer), CPU, 1, repeats)
    return {
        "params": count_parameters(modules),
        "batch": batch,
        "samples": samples,
        "times_ms": times,
        "peak_rss_mib": (status_kib("VmHWM") - baseline) / 1024,
    }


def run_child(job: str, args: argparse.Namespace) -> dict:
    """Runs one model (or the demo training step) in a fresh process; returns its JSON result."""
    command = [sys.executable, __file__, "--child", job, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--lengths", args.lengths, "--allocator", args.allocator]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile(model: str, seconds: float, rows: int) -> None:
    """Prints the top operators (self CPU time) of one inference, after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    modules, num_spks, _ = load_model(HPARAMS_DIR / f"{model}.yaml", CPU)
    mixture, _ = random_batch(1, round(seconds * SAMPLE_RATE), num_spks, CPU)
    step = inference_step(modules, num_spks, mixture, "fp32")
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def report(results: Dict[str, dict], lengths: List[float], machine: str, args: argparse.Namespace) -> str:
    """The markdown table."""
    heads = [f"RTF {s:g} s" for s in lengths] + [f"peak MiB {s:g} s" for s in lengths]
    lines = [
        "# CPU real-time factor of separation (batch 1, fp32)",
        "",
        f"Machine: {machine}. Allocator: {args.allocator}. Median of {args.repeats} separations after a 1 s "
        "warm-up, each model in a fresh process; peak MiB = peak resident memory above the built model. "
        f"RTF = processing time / audio duration. Produced by `python {' '.join(sys.argv)}`.",
        f"Reference: {REFERENCE}.",
        "",
        "| model | params | " + " | ".join(heads) + " | target | verdict |",
        "|---" * (len(heads) + 4) + "|",
    ]
    for model, result in results.items():
        if model == DEMO_TRAIN:
            continue
        if "error" in result:
            lines.append(f"| {model} | error: {result['error']} |")
            continue
        points = [result["lengths"].get(str(s)) for s in lengths]
        rtfs = [p["rtf"] for p in points]
        target = TARGETS.get(model)
        verdict = "-" if target is None else ("PASS" if max(rtfs) <= target else "FAIL")
        lines.append(
            f"| {model} | {result['params'] / 1e6:.2f}M | " + " | ".join(f"{r:.3f}" for r in rtfs) + " | "
            + " | ".join(f"{p['peak_rss_mib']:.0f}" for p in points)
            + f" | {'-' if target is None else f'<= {target}'} | {verdict} |"
        )
    demo = results.get(DEMO_TRAIN)
    if demo:
        lines += ["", "## Training step of the demo configuration", ""]
        if "error" in demo:
            lines.append(f"error: {demo['error']}")
        else:
            lines.append(
                f"{DEMO_RECIPE.relative_to(REPO_ROOT)} with DEMO_OVERRIDES: batch {demo['batch']} x "
                f"{demo['samples']} samples ({demo['samples'] / SAMPLE_RATE:g} s), fp32, "
                f"{demo['params'] / 1e6:.2f}M parameters: {median(demo['times_ms']):.0f} ms per step "
                f"(median of {len(demo['times_ms'])} after 1 warm-up; forward + PIT SI-SNR + backward + optimizer "
                f"step), peak {demo['peak_rss_mib']:.0f} MiB above the built model."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated hparams/<name>.yaml stems")
    parser.add_argument("--lengths", default="10,60", help="mixture lengths in seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allocator", choices=("keep-freed", "default"), default="keep-freed")
    parser.add_argument("--no-demo-train", action="store_true", help="skip the demo training step")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cpu_rtf.md")
    parser.add_argument("--profile", metavar="MODEL", help="only print the top operators of one inference")
    parser.add_argument("--profile-seconds", type=float, default=4.0)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [float(s) for s in args.lengths.split(",") if s]

    if args.profile or args.child:
        set_up_process(args.threads, args.allocator)
    if args.profile:
        print(f"# {machine_description(args.threads)}; {args.profile}, {args.profile_seconds:g} s, fp32")
        profile(args.profile, args.profile_seconds, args.profile_rows)
        return
    if args.child:
        result = measure_demo_training(args.repeats) if args.child == DEMO_TRAIN else \
            measure_model(args.child, lengths, args.repeats)
        print(json.dumps(result))
        return

    machine = machine_description(args.threads)
    print(f"# CPU RTF: {machine}", flush=True)
    jobs = [m for m in args.models.split(",") if m] + ([] if args.no_demo_train else [DEMO_TRAIN])
    results = {}
    for job in jobs:
        results[job] = run_child(job, args)
        print(f"{job}: {json.dumps(results[job])}", flush=True)
    text = report(results, lengths, machine, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
