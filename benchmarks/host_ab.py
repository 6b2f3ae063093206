"""Eager separation time of this checkout against another one, interleaved in one process.

Short inputs are bound by the host's time per kernel launch, and on a shared
machine that time drifts by tens of percent between calls or even processes.
Compared in one process, rounds alternating between the two versions, the
drift hits both alike. The baseline checkout's ``speechbrain_mamba`` is copied
under another package name (its imports rewritten), both models are built from
the same hparams file with the same weights, and each round times ``--calls``
separations of each, baseline first in even rounds and second in odd ones.

Usage (from the repository root)::

    git worktree add /tmp/baseline <commit>
    python benchmarks/host_ab.py --baseline /tmp/baseline --model dpmamba_m --lengths 1,4
"""

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils  # noqa: E402

PACKAGE = "speechbrain_mamba"
BASELINE_PACKAGE = "speechbrain_mamba_baseline"


def copy_as_baseline(checkout: Path, into: Path) -> None:
    """Copies ``checkout``'s package to ``into/speechbrain_mamba_baseline`` with its imports renamed."""
    source = checkout / PACKAGE
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: no {PACKAGE}/__init__.py there.")
    target = into / BASELINE_PACKAGE
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(rf"\b{PACKAGE}\b")
    for path in target.rglob("*.py"):
        path.write_text(pattern.sub(BASELINE_PACKAGE, path.read_text()))


def load_baseline(hparams_file: Path, device: torch.device, weights: Dict[str, torch.Tensor]):
    """The hparams file's modules built from the baseline package, with ``weights`` loaded."""
    text = re.sub(rf"\b{PACKAGE}\b", BASELINE_PACKAGE, hparams_file.read_text())
    modules, _, _ = bench_utils.modules_from_yaml(text, device)
    modules.load_state_dict(weights)
    return modules


def describe(checkout: Path) -> str:
    """The checkout's commit, or a note that it has none (e.g. an exported tree inside another repository)."""
    if not (checkout / ".git").exists():  # a directory, or a file in a worktree
        return "not a git checkout"
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit}"


def compare(steps: Dict[str, Callable[[], None]], rounds: int, calls: int) -> Dict[str, List[float]]:
    """ms per call of each step, one entry per round, the order of the two flipped every round."""
    names = list(steps)
    for step in steps.values():
        step()
        step()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            times[name].append(bench_utils.back_to_back_ms(steps[name], calls))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the version to compare with")
    parser.add_argument("--model", default="dpmamba_m", help="a file of hparams/ without .yaml")
    parser.add_argument("--lengths", default="1,4", help="mixture lengths in seconds, comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10, help="separations per round and version")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    hparams_file = bench_utils.HPARAMS_DIR / f"{args.model}.yaml"
    modules, num_spks, _ = bench_utils.load_model(hparams_file, device)
    with tempfile.TemporaryDirectory() as folder:
        copy_as_baseline(args.baseline, Path(folder))
        sys.path.insert(0, folder)
        baseline = load_baseline(hparams_file, device, modules.state_dict())
        lines = [
            f"# Eager separation, {args.model}, this checkout against {args.baseline} ({describe(args.baseline)})",
            "",
            f"Machine: {bench_utils.machine_description(device=device)}. "
            f"Scan backend: {bench_utils.scan_backend(device)}.",
            f"Command: `python benchmarks/host_ab.py {' '.join(sys.argv[1:])}`",
            "",
            f"Batch 1, inference mode. {args.rounds} rounds of {args.calls} separations per version, the order "
            "flipped every round; ms per separation: least and median over the rounds; ratio: median over the "
            "rounds of this checkout's time / the baseline's in the same round.",
            "",
            "| length | dtype | baseline least | baseline median | this least | this median | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for seconds in (float(value) for value in args.lengths.split(",")):
            mixture, _ = bench_utils.random_batch(1, int(seconds * bench_utils.SAMPLE_RATE), num_spks, device)
            for dtype in args.dtypes.split(","):
                steps = {
                    "baseline": bench_utils.inference_step(baseline, num_spks, mixture, dtype),
                    "this": bench_utils.inference_step(modules, num_spks, mixture, dtype),
                }
                times = compare(steps, args.rounds, args.calls)
                ratio = statistics.median(a / b for a, b in zip(times["this"], times["baseline"]))
                cells = [f"{f(times[name]):.1f}" for name in ("baseline", "this") for f in (min, statistics.median)]
                lines.append(f"| {seconds:g} s | {dtype} | {' | '.join(cells)} | {ratio:.2f} |")
                print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_ab.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
