#!/usr/bin/env python3
"""Data-parallel scaling of the WSJ0Mix recipe: the same training on 1 process and on K processes.

    python benchmarks/ddp_scaling.py --gpus 2 --out benchmarks/results/ddp_scaling  # on a 2-GPU machine
    python benchmarks/ddp_scaling.py --gpus 2 --device cpu --hparams tests/hparams/tiny_separation.yaml  # check on CPU

Each run is ``recipes/WSJ0Mix/separation/train.py`` under ``torch.distributed.run`` on the demo corpus (or
``--data_folder``), DPMamba-M in bf16 by default, with a timing Brain: epoch 1 warms up, epoch 2 is timed.
Reports optimizer steps per second, mixtures per second (steps x processes x batch), the scaling efficiency
against the 1-process run, the peak memory of every GPU, and checks that the parameters are bitwise identical
on every rank at the end. Writes ``<out>.json`` and ``<out>.md``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO_ROOT / "recipes" / "WSJ0Mix" / "separation" / "train.py"


def _worker() -> None:
    """One rank: the recipe's main() with a Brain that times epoch 2 and dumps its parameters."""
    import speechbrain as sb
    import torch

    from speechbrain_mamba.separation import recipe

    class TimedSeparation(recipe.Separation):
        def on_stage_start(self, stage, epoch=None):
            super().on_stage_start(stage, epoch)
            if stage == sb.Stage.TRAIN:
                self._synchronize()
                self.epoch_start, self.epoch_steps = time.perf_counter(), self.optimizer_step
                if "cuda" in str(self.device):
                    torch.cuda.reset_peak_memory_stats()

        def on_stage_end(self, stage, stage_loss, epoch=None):
            if stage == sb.Stage.TRAIN:
                self._synchronize()
                seconds = time.perf_counter() - self.epoch_start
                record = {"epoch": epoch, "seconds": seconds, "steps": self.optimizer_step - self.epoch_steps}
                if "cuda" in str(self.device):
                    record["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
                folder = Path(self.hparams.output_folder)
                with open(folder / f"timing_rank{self.rank}.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                state = {k: v.detach().cpu() for k, v in self.modules.state_dict().items()}
                torch.save(state, folder / f"params_rank{self.rank}.pt")
            super().on_stage_end(stage, stage_loss, epoch)

        def _synchronize(self):
            if "cuda" in str(self.device):
                torch.cuda.synchronize()

    recipe.Separation = TimedSeparation
    recipe.main()


def _run(processes: int, args: argparse.Namespace, out: Path) -> Dict[str, object]:
    """Trains with ``processes`` ranks; returns the timed epoch's figures and the parameter check."""
    backend = "nccl" if args.device == "cuda" else "gloo"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        str(Path(__file__).resolve()), "--worker", str(args.hparams.resolve()),
        "--distributed_backend", backend, "--device", args.device, "--noprogressbar",
        "--output_folder", str(out), "--number_of_epochs", "2", "--precision", args.precision,
        "--mixtures_per_epoch", str(args.steps * processes * args.batch_size), "--batch_size", str(args.batch_size),
        "--training_signal_len", str(args.segment), "--num_workers", "2", "--demo_folder", str(out.parent / "demo"),
    ]  # fmt: skip
    if args.data_folder:
        command += ["--data_folder", args.data_folder, "--dm_folder", args.dm_folder]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    log = args.out.parent / f"{args.out.name}_{processes}proc.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        returncode = subprocess.call(command, cwd=TRAIN_PY.parent, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if returncode != 0:
        raise SystemExit(f"The {processes}-process run failed (exit {returncode}); see {log}")

    import torch

    timed = [json.loads((out / f"timing_rank{r}.jsonl").read_text().splitlines()[-1]) for r in range(processes)]
    params = [torch.load(out / f"params_rank{r}.pt") for r in range(processes)]
    differing = sorted(k for k in params[0] for other in params[1:] if not torch.equal(params[0][k], other[k]))
    steps, seconds = timed[0]["steps"], max(t["seconds"] for t in timed)
    return {
        "processes": processes,
        "steps": steps,
        "seconds": seconds,
        "steps_per_second": steps / seconds,
        "mixtures_per_second": steps * processes * args.batch_size / seconds,
        "peak_memory_mib_per_rank": [t.get("peak_memory_mib") for t in timed],
        "parameters_identical_across_ranks": not differing,
        "differing_parameters": differing[:10],
    }


def main(argv: List[str]) -> None:
    if argv[:1] == ["--worker"]:
        sys.argv = [str(TRAIN_PY)] + argv[1:]
        _worker()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the parallel run (one per GPU)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--hparams", type=Path, default=TRAIN_PY.parent / "hparams" / "dpmamba_m.yaml")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch_size", type=int, default=1, help="per process")
    parser.add_argument("--segment", type=int, default=32000, help="training segment in samples (4 s at 8 kHz)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch and process")
    parser.add_argument("--data_folder", help="a wsj0-mix folder instead of the demo corpus")
    parser.add_argument("--dm_folder", help="the WSJ0 utterances for dynamic mixing, with --data_folder")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ddp_scaling")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s).")

    with tempfile.TemporaryDirectory() as scratch:
        runs = [_run(n, args, Path(scratch) / f"{n}proc") for n in (1, args.gpus)]
    single = runs[0]
    for run in runs:
        run["scaling_efficiency"] = run["mixtures_per_second"] / (single["mixtures_per_second"] * run["processes"])
    result = {"hparams": str(args.hparams), "device": args.device, "precision": args.precision,
              "batch_size_per_process": args.batch_size, "segment_samples": args.segment, "runs": runs,
              "machine": _machine(args.device)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# DDP scaling: {args.hparams.name}, {args.precision}, batch {args.batch_size}/process, "
             f"{args.segment} samples", "", f"Machine: {result['machine']}", "",
             "| processes | steps/s | mixtures/s | efficiency | peak memory per rank (MiB) | params identical |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        memory = ", ".join("-" if m is None else f"{m:.0f}" for m in run["peak_memory_mib_per_rank"])
        lines.append(f"| {run['processes']} | {run['steps_per_second']:.2f} | {run['mixtures_per_second']:.2f} | "
                     f"{run['scaling_efficiency']:.2f} | {memory} | {run['parameters_identical_across_ranks']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(run["parameters_identical_across_ranks"] for run in runs):
        raise SystemExit("Parameters differ across ranks: " + str([r["differing_parameters"] for r in runs]))


def _machine(device: str) -> str:
    import platform

    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"


if __name__ == "__main__":
    main(sys.argv[1:])
