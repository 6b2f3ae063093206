"""Separation models side by side: inference and training-step time and memory, GMAC per second.

Every model is built from ``hparams/<model>.yaml`` with random weights and run
through ``separate_mixture`` (the forward of training and inference), all in
one process, following docs/benchmarks.md:

* inference: batch 1, mixtures of ``--lengths`` seconds at 8 kHz, under
  ``torch.inference_mode()``, fp32 and bf16 autocast;
* training step: ``--train-seconds`` s, batch 1 and 4, forward + PIT negative
  SI-SNR (SpeechBrain's ``get_si_snr_with_pitwrapper``) + backward + Adam step;
* time: CUDA events, median of ``--repeats`` calls after ``--warmup`` calls at
  the same shape; memory: ``max_memory_allocated()`` after
  ``reset_peak_memory_stats()`` minus ``memory_allocated()`` before the call
  (weights and the optimizer state excluded). On the CPU only time is taken.
  An out-of-memory error is a result ("oom"); longer inputs of the same series
  are then not tried.
* GMAC per second of audio: ``FlopCounterMode`` on one fp32 forward of
  ``--flops-seconds`` s. The selective scan is routed through a custom op whose
  registered formula counts 9*B*E*N*L flops (discretisation exp(dt*A) and
  dt*B*u: 4, the recurrence h = a*h + b: 2, C*h summed over N: 2, the exp: 1)
  plus B*E*L each for the softplus of dt, the D skip and the z gate.
  FlopCounterMode counts matmuls and convolutions (2 flops per MAC) and no other
  elementwise op; GMAC = flops / 2.

Points run by priority within a global ``--budget-s``: first the models the
issue-5 targets compare (DPMamba-M, SepMamba-M, Sepformer, DPRNN) up to 60 s,
then the other models and the GMAC counts, then the lengths above 60 s; within
a priority the cheapest points first. A point whose time, extrapolated from
the same series, would pass the budget is recorded as "skipped". Results are
written after every point (``results.json``, ``results.csv``), then the PNG
plots (when matplotlib imports) and ``summary.md`` with ratios against
Sepformer, DPRNN, the anchors in benchmarks/anchors/ (kernels.md) and the
issue-5 targets. ``--plot-only results.json`` redoes plots and summary.

Usage (GPU): python benchmarks/separation_models.py --device cuda --out OUT_DIR
Check on CPU: python benchmarks/separation_models.py --quick --models dpmamba_xs,sepformer --out /tmp/x
"""

import argparse
import csv
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from bench_utils import (
    DTYPES,
    HPARAMS_DIR,
    RESULTS_DIR,
    SAMPLE_RATE,
    count_parameters,
    inference_step,
    load_model,
    machine_description,
    median,
    parse_model,
    random_batch,
    scan_backend,
    tf32_flags,
    time_and_memory,
    training_step,
)

MODELS = (
    "dpmamba_xs", "dpmamba_s", "dpmamba_m", "dpmamba_l", "mamba_tasnet_m",
    "sepmamba_s", "sepmamba_m", "sepmamba_causal_m", "sepformer", "dprnn",
)
TARGET_MODELS = ("dpmamba_m", "sepmamba_m", "sepformer", "dprnn")  # measured first
BASELINES = ("sepformer", "dprnn")
LENGTHS = (1, 2, 4, 8, 16, 32, 60, 120)
LONG_LENGTH = 60  # inputs longer than this are measured last
TRAIN_BATCHES = (1, 4)
# The SepMamba paper's figures (Avenstrup et al., arXiv 2410.20997, as ../shared/docs/models.md lists them):
# parameters, GMAC per second of audio, one forward time and one memory figure (protocols not stated).
SEPMAMBA_PAPER = {
    "sepmamba_s": dict(params_m=7.254, gmac_per_s=12.46, forward_ms=17.84, memory_gb=2.00),
    "sepmamba_m": dict(params_m=22.249, gmac_per_s=37.0, forward_ms=27.25, memory_gb=3.04),
}
ANCHORS_DIR = Path(__file__).resolve().parent / "anchors"
FULL_DEFAULTS = {"lengths": ",".join(map(str, LENGTHS)), "train_seconds": 4.0, "flops_seconds": 4.0, "repeats": 3}
QUICK_DEFAULTS = {"lengths": "0.25,0.5", "train_seconds": 0.25, "flops_seconds": 0.25, "repeats": 1}
CSV_FIELDS = (
    "model", "kind", "dtype", "seconds", "batch", "status", "time_ms", "min_ms", "mem_mib", "repeats",
    "params", "gmac_per_s", "scan_gmac_per_s", "note",
)


# ----------------------------------------------------------------------------- GMAC counting
@torch.library.custom_op("speechbrain_mamba_bench::selective_scan", mutates_args=())
def _counted_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    reverse: bool,
    output_scale: float,
    output_add: Optional[torch.Tensor],
    backend: Optional[str],
) -> torch.Tensor:
    """The package's selective scan as one opaque op that FlopCounterMode can see."""
    from speechbrain_mamba.ops import selective_scan

    return selective_scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse,
        output_scale=output_scale, output_add=output_add, backend=backend,
    )


@register_flop_formula(torch.ops.speechbrain_mamba_bench.selective_scan)
def _scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, delta_bias_shape,
                delta_softplus, *args, out_shape=None, **kwargs) -> int:
    """9*B*E*N*L flops for the scan proper, plus B*E*L per softplus, D skip and z gate (BiMamba's average,
    fused into the scan as ``output_scale``/``output_add``, is not counted: elementwise ops are not)."""
    batch, channels, length = u_shape
    per_frame = batch * channels * length
    flops = 9 * per_frame * A_shape[1]
    flops += per_frame * (int(delta_softplus) + (D_shape is not None) + (z_shape is not None))
    return flops


@torch.library.custom_op("speechbrain_mamba_bench::causal_conv1d_silu", mutates_args=())
def _counted_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool, backend: Optional[str]
) -> torch.Tensor:
    """The package's causal depthwise convolution + SiLU as one opaque op that FlopCounterMode can see (its
    PyTorch backend adds shifted taps, which FlopCounterMode would not count)."""
    from speechbrain_mamba.ops import causal_conv1d_silu

    return causal_conv1d_silu(x, weight, bias, reverse=reverse, backend=backend)


@register_flop_formula(torch.ops.speechbrain_mamba_bench.causal_conv1d_silu)
def _conv_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """2*B*L*E*K: a multiply and an add per tap and output, as FlopCounterMode counts ``F.conv1d``."""
    batch, length, channels = x_shape
    return 2 * batch * length * channels * weight_shape[-1]


@contextmanager
def counted_ops() -> Iterator[None]:
    """Routes the Mamba lobes' selective scan and causal convolution through the counted custom ops."""
    import speechbrain_mamba.lobes.mamba as mamba_lobe

    originals = mamba_lobe.selective_scan, mamba_lobe.causal_conv1d_silu

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
             initial_state=None, reverse=False, output_scale=1.0, output_add=None, backend=None):
        if return_last_state or initial_state is not None:
            raise NotImplementedError("GMAC counting covers offline separation, not streaming state.")
        return _counted_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, float(output_scale),
                             output_add, backend)

    def conv(x, weight, bias=None, reverse=False, backend=None):
        return _counted_conv(x, weight, bias, reverse, backend)

    mamba_lobe.selective_scan, mamba_lobe.causal_conv1d_silu = scan, conv
    try:
        yield
    finally:
        mamba_lobe.selective_scan, mamba_lobe.causal_conv1d_silu = originals


def count_gmac(modules: torch.nn.ModuleDict, num_spks: int, mixture: torch.Tensor) -> Tuple[float, float]:
    """GMAC of one fp32 forward, in total and in the selective scan."""
    counter = FlopCounterMode(display=False)
    with counted_ops(), counter:
        inference_step(modules, num_spks, mixture, "fp32")()
    scan_flops = sum(
        count for op, count in counter.get_flop_counts()["Global"].items() if "selective_scan" in str(op)
    )
    return counter.get_total_flops() / 2e9, scan_flops / 2e9


# ----------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: ``kind`` is "infer", "train" or "gmac"."""

    model: str
    kind: str
    dtype: str
    seconds: float
    batch: int

    @property
    def work(self) -> float:
        """Audio seconds through the model (x3 for a training step), the unit of the cost estimate."""
        return self.seconds * self.batch * (3 if self.kind == "train" else 1)

    def series(self) -> Tuple[str, str, str, int]:
        """Points that differ only in length: their time scales with it, and OOM carries over."""
        return self.model, self.kind, self.dtype, self.batch


KINDS = ("infer", "train", "gmac")


def plan(models: Sequence[str], lengths: Sequence[float], dtypes: Sequence[str],
         train_seconds: float, flops_seconds: float, kinds: Sequence[str] = KINDS) -> List[Point]:
    """Every point of ``kinds``, in the order they are measured (most important, then cheapest, first)."""
    points = [Point(m, "infer", d, s, 1) for m in models for d in dtypes for s in lengths]
    points += [Point(m, "train", d, train_seconds, b) for m in models for d in dtypes for b in TRAIN_BATCHES]
    points += [Point(m, "gmac", "fp32", flops_seconds, 1) for m in models]
    points = [point for point in points if point.kind in kinds]

    def priority(point: Point) -> Tuple:
        if point.kind == "infer" and point.seconds > LONG_LENGTH:
            tier = 2
        elif point.model in TARGET_MODELS and point.kind != "gmac":
            tier = 0
        else:
            tier = 1
        return tier, point.work, models.index(point.model), dtypes.index(point.dtype), point.kind

    return sorted(points, key=priority)


# ----------------------------------------------------------------------------- measuring
class Runner:
    """Measures points in order, keeping the built models and the records."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.models: Dict[str, Tuple[torch.nn.ModuleDict, int]] = {}
        self.build_errors: Dict[str, str] = {}
        self.records: List[dict] = []

    def model(self, name: str) -> Tuple[torch.nn.ModuleDict, int]:
        """Built once, on first use."""
        if name in self.build_errors:
            raise RuntimeError(self.build_errors[name])
        if name not in self.models:
            try:
                stem, overrides = parse_model(name)
                modules, num_spks, _ = load_model(HPARAMS_DIR / f"{stem}.yaml", self.device, overrides)
            except Exception as error:
                self.build_errors[name] = f"model build failed: {error!r}"
                raise
            self.models[name] = (modules, num_spks)
        return self.models[name]

    def skip_reason(self, point: Point) -> Optional[Tuple[str, str]]:
        """(status, note) when the point is not run: OOM at a shorter input, or the budget."""
        same = [r for r in self.records if (r["model"], r["kind"], r["dtype"], r["batch"]) == point.series()]
        oom = [r["seconds"] for r in same if r["status"] == "oom" and r["seconds"] < point.seconds]
        if oom:
            return "oom", f"not run: OOM at {min(oom):g} s"
        left = self.deadline - time.monotonic()
        measured = [r for r in self.records if r["status"] == "ok" and r.get("time_ms")
                    and (r["model"], r["kind"], r["dtype"]) == point.series()[:3]]
        if measured:  # the largest measured point of the series, any batch, scaled to this one's size
            last = max(measured, key=lambda r: r["seconds"] * r["batch"])
            per_call = last["time_ms"] / 1e3 * point.seconds * point.batch / (last["seconds"] * last["batch"])
            needed = per_call * (self.args.warmup + self.args.repeats)
            if needed > left:
                return "skipped", f"budget: ~{needed:.0f} s needed, {max(left, 0):.0f} s left"
        elif left <= 0:
            return "skipped", "budget exhausted"
        return None

    def measure(self, point: Point) -> dict:
        """Runs one point; returns its record."""
        record = {**dataclasses.asdict(point), "status": "ok", "note": ""}
        modules, num_spks = self.model(point.model)
        record["params"] = count_parameters(modules)
        samples = round(point.seconds * SAMPLE_RATE)
        mixture, sources = random_batch(point.batch, samples, num_spks, self.device)
        if point.kind == "gmac":
            total, scan = count_gmac(modules, num_spks, mixture)
            record.update(gmac_per_s=total / point.seconds, scan_gmac_per_s=scan / point.seconds)
            return record
        if point.kind == "infer":
            step = inference_step(modules, num_spks, mixture, point.dtype)
        else:
            optimizer = torch.optim.Adam(modules.parameters(), lr=1.5e-4)
            step = training_step(modules, num_spks, mixture, sources, point.dtype, optimizer)
        times, memory = time_and_memory(step, self.device, self.args.warmup, self.args.repeats, self.deadline)
        record.update(time_ms=median(times), min_ms=min(times), mem_mib=memory, repeats=len(times),
                      times_ms=times)
        if len(times) < self.args.repeats:
            record["note"] = f"{len(times)} of {self.args.repeats} repeats (budget)"
        return record

    def run(self, points: List[Point], out: Path, meta: dict) -> None:
        """Measures every point, saving the results after each."""
        for index, point in enumerate(points):
            reason = self.skip_reason(point)
            if reason:
                record = {**dataclasses.asdict(point), "status": reason[0], "note": reason[1]}
            else:
                try:
                    record = self.measure(point)
                except torch.cuda.OutOfMemoryError:
                    record = {**dataclasses.asdict(point), "status": "oom", "note": ""}
                except Exception as error:  # one broken model must not end the run
                    traceback.print_exc()
                    record = {**dataclasses.asdict(point), "status": "error", "note": repr(error)[:300]}
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self.records.append(record)
            print(f"[{index + 1}/{len(points)} {time.monotonic() - self.start:6.0f} s] "
                  f"{describe(record)}", flush=True)
            save_results(out, meta, self.records)


def describe(record: dict) -> str:
    """One log line per record."""
    head = f"{record['model']:18s} {record['kind']:5s} {record['dtype']} {record['seconds']:g} s x{record['batch']}"
    if record["status"] != "ok":
        return f"{head}: {record['status'].upper()} {record['note']}"
    if record["kind"] == "gmac":
        return f"{head}: {record['gmac_per_s']:.2f} GMAC/s (scan {record['scan_gmac_per_s']:.2f})"
    memory = "" if record["mem_mib"] is None else f" {record['mem_mib']:.0f} MiB"
    return f"{head}: {record['time_ms']:.1f} ms{memory} ({record['repeats']} runs) {record['note']}"


# ----------------------------------------------------------------------------- output
def save_results(out: Path, meta: dict, records: List[dict]) -> None:
    """results.json (meta + every point) and results.csv (one row per point)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "points": records}, indent=1))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot(out: Path, records: List[dict]) -> List[Path]:
    """time vs length and memory vs length, one line per model, a panel per dtype (log axes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (run --plot-only results.json where it is)")
        return []
    infer = [r for r in records if r["kind"] == "infer" and r["status"] == "ok"]
    dtypes = sorted({r["dtype"] for r in infer}, key=list(DTYPES).index)
    written = []
    for quantity, label, filename in (("time_ms", "time (ms)", "infer_time.png"),
                                      ("mem_mib", "peak memory above weights (MiB)", "infer_memory.png")):
        if not dtypes or all(r.get(quantity) is None for r in infer):
            continue
        figure, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 5), squeeze=False)
        for axis, dtype in zip(axes[0], dtypes):
            for model in dict.fromkeys(r["model"] for r in infer):
                points = sorted((r["seconds"], r[quantity]) for r in infer
                                if r["model"] == model and r["dtype"] == dtype and r.get(quantity) is not None)
                if points:
                    style = "--" if model in BASELINES else "-"
                    axis.plot(*zip(*points), style, marker="o", markersize=3, label=model)
            axis.set(xscale="log", yscale="log", xlabel="mixture length (s, 8 kHz)", ylabel=label,
                     title=f"inference, batch 1, {dtype}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=120)
        plt.close(figure)
        written.append(out / filename)
    return written


def load_anchors(directory: Path) -> Dict[str, dict]:
    """Model name -> {"infer": {seconds: {ms, peak_MiB}}, "train": {dtype: {...}}, "source": file}."""
    anchors = {}
    for path in sorted(directory.glob("*.json")):
        for name, values in json.loads(path.read_text())["models"].items():
            anchors[name] = {"infer": {float(k): v for k, v in values["infer"].items()},
                             "train": values["train"], "source": path.name}
    return anchors


class Table:
    """Lookup of the ok records: time and memory by point."""

    def __init__(self, records: List[dict]):
        self.by_key = {(r["model"], r["kind"], r["dtype"], float(r["seconds"]), r["batch"]): r for r in records}

    def get(self, model: str, kind: str, dtype: str, seconds: float, batch: int = 1) -> Optional[dict]:
        return self.by_key.get((model, kind, dtype, float(seconds), batch))

    def value(self, model: str, kind: str, dtype: str, seconds: float, batch: int, field: str) -> Optional[float]:
        record = self.get(model, kind, dtype, seconds, batch)
        return record.get(field) if record and record["status"] == "ok" else None

    def ratio(self, model: str, other: str, kind: str, dtype: str, seconds: float, batch: int,
              field: str) -> Optional[float]:
        mine = self.value(model, kind, dtype, seconds, batch, field)
        theirs = self.value(other, kind, dtype, seconds, batch, field)
        return mine / theirs if mine is not None and theirs else None


def cell(record: Optional[dict]) -> str:
    """A table cell: "ms / MiB", or the status."""
    if record is None:
        return "-"
    if record["status"] != "ok":
        return record["status"].upper() if record["status"] == "oom" else record["status"]
    text = f"{record['time_ms']:.1f} ms"
    if record.get("mem_mib") is not None:
        text += f" / {record['mem_mib']:.0f} MiB"
    return text + ("*" if record["repeats"] < 3 else "")


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def verdict(ratios: List[Optional[float]], limit: float) -> str:
    """PASS / FAIL on the worst ratio; "n/a" when a point is missing."""
    if not ratios or any(r is None for r in ratios):
        return "n/a (missing points)"
    worst = max(ratios)
    return f"{'PASS' if worst <= limit else 'FAIL'} (worst {worst:.2f}, limit {limit})"


def target_lines(table: Table, anchors: Dict[str, dict], lengths: List[float]) -> List[str]:
    """The issue-5 targets, each with its verdict and ratios."""
    lines = ["| target | verdict | ratios |", "|---|---|---|"]
    dtypes = ("fp32", "bf16")

    def ratios(kind, dtype, seconds, batch, field, model="dpmamba_m"):
        return table.ratio(model, "sepformer", kind, dtype, seconds, batch, field)

    for field, limit, what in (("time_ms", 0.5, "time"), ("mem_mib", 0.3, "memory")):
        values = [ratios("infer", d, 60, 1, field) for d in dtypes]
        lines.append(f"| DPMamba-M inference 60 s {what} <= {limit}x Sepformer (fp32, bf16) | "
                     f"{verdict(values, limit)} | {', '.join(map(fmt_ratio, values))} |")
    upto60 = [s for s in lengths if 1 <= s <= 60]
    values = [ratios("infer", d, s, 1, "time_ms") for d in dtypes for s in upto60]
    lines.append(f"| DPMamba-M inference never slower than Sepformer, {upto60[0] if upto60 else 1:g}..60 s, "
                 "fp32+bf16 | "
                 f"{verdict(values, 1.0)} | {', '.join(map(fmt_ratio, values))} |")
    train_seconds = sorted({key[3] for key in table.by_key if key[1] == "train"})
    # Options measured beside the default (``dpmamba_m:recompute_projections=true``) get their own verdicts.
    variants = sorted({key[0] for key in table.by_key if key[0].startswith("dpmamba_m:") and key[1] == "train"})
    for model in ["dpmamba_m", *variants]:
        name = "DPMamba-M" + (f" ({model.split(':', 1)[1]})" if ":" in model else "")
        for field, limit, what in (("time_ms", 0.7, "time"), ("mem_mib", 0.5, "memory")):
            values = [ratios("train", "bf16", s, b, field, model) for s in train_seconds for b in TRAIN_BATCHES]
            lines.append(f"| {name} train step bf16 {what} <= {limit}x Sepformer (batch 1, 4) | "
                         f"{verdict(values, limit)} | {', '.join(map(fmt_ratio, values))} |")
    anchor = anchors.get("sepmamba_m")
    variants = sorted({key[0] for key in table.by_key if key[0].startswith("sepmamba_m:")})
    for model in ["sepmamba_m", *variants] if anchor else []:
        values, labels = [], []
        for seconds, ref in sorted(anchor["infer"].items()):
            for field, key in (("time_ms", "ms"), ("mem_mib", "peak_MiB")):
                mine = table.value(model, "infer", "fp32", seconds, 1, field)
                values.append(None if mine is None else mine / ref[key])
                labels.append(f"{seconds:g}s {key}")
        for dtype, ref in anchor["train"].items():
            for field, key in (("time_ms", "ms"), ("mem_mib", "peak_MiB")):
                mine = table.value(model, "train", dtype, 4, 1, field)
                values.append(None if mine is None else mine / ref[key])
                labels.append(f"train {dtype} {key}")
        pairs = ", ".join(f"{label} {fmt_ratio(v)}" for label, v in zip(labels, values))
        name = "SepMamba-M" + (f" ({model.split(':', 1)[1]})" if ":" in model else "")
        lines.append(f"| {name} <= 0.7x the mamba-ssm SepMamba-M anchor (time and memory) | "
                     f"{verdict(values, 0.7)} | {pairs} |")
    return lines


def summary(meta: dict, records: List[dict], anchors: Dict[str, dict]) -> str:
    """The markdown report."""
    table = Table(records)
    models = sorted(dict.fromkeys(r["model"] for r in records),
                    key=lambda m: MODELS.index(m) if m in MODELS else len(MODELS))
    lengths = sorted({float(r["seconds"]) for r in records if r["kind"] == "infer"})
    dtypes = [d for d in DTYPES if any(r["dtype"] == d and r["kind"] == "infer" for r in records)]
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "oom", "skipped", "error")}
    lines = [
        "# Separation models: time, memory, GMAC",
        "",
        f"Machine: {meta['machine']}. Device: {meta['device']}. Scan backend: {meta['scan_backend']}. "
        f"{meta['tf32']}.",
        f"Command: `{meta['command']}` ({meta['started']}). Protocol: docs/benchmarks.md; median of "
        f"{meta['repeats']} calls after {meta['warmup']} warm-up (* = fewer repeats, budget); memory = peak "
        "allocated above what was allocated before the call (weights, optimizer state excluded).",
        f"Points: {counts['ok']} measured, {counts['oom']} OOM, {counts['skipped']} skipped (budget), "
        f"{counts['error']} errors.",
        "",
        "## Issue-5 targets",
        "",
        *target_lines(table, anchors, lengths),
        "",
        "The SepMamba anchor was measured in another run (2026-11-23, H100, mamba-ssm kernels); see the anchor "
        "table below for how this run's Sepformer and DPRNN compare with theirs.",
    ]
    for dtype in dtypes:
        lines += ["", f"## Inference, batch 1, {dtype}: time / memory", "",
                  "| model | " + " | ".join(f"{s:g} s" for s in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(cell(table.get(m, "infer", dtype, s)) for s in lengths) + " |"
                  for m in models]
        for baseline in (b for b in BASELINES if b in models):
            lines += ["", f"Ratio to {baseline} ({dtype}), time / memory:", "",
                      "| model | " + " | ".join(f"{s:g} s" for s in lengths) + " |",
                      "|---" * (len(lengths) + 1) + "|"]
            lines += [f"| {m} | " + " | ".join(
                f"{fmt_ratio(table.ratio(m, baseline, 'infer', dtype, s, 1, 'time_ms'))} / "
                f"{fmt_ratio(table.ratio(m, baseline, 'infer', dtype, s, 1, 'mem_mib'))}" for s in lengths) + " |"
                for m in models if m != baseline]
    train = sorted({(r["dtype"], float(r["seconds"]), r["batch"]) for r in records if r["kind"] == "train"},
                   key=lambda k: (list(DTYPES).index(k[0]), k[2]))
    if train:
        heads = [f"{d} {s:g} s x{b}" for d, s, b in train]
        lines += ["", "## Training step (forward + PIT SI-SNR + backward + Adam): time / memory", "",
                  "| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(cell(table.get(m, "train", d, s, b)) for d, s, b in train) + " |"
                  for m in models]
        for baseline in (b for b in BASELINES if b in models):
            lines += ["", f"Ratio to {baseline}, time / memory:", "",
                      "| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
            lines += [f"| {m} | " + " | ".join(
                f"{fmt_ratio(table.ratio(m, baseline, 'train', d, s, b, 'time_ms'))} / "
                f"{fmt_ratio(table.ratio(m, baseline, 'train', d, s, b, 'mem_mib'))}" for d, s, b in train) + " |"
                for m in models if m != baseline]
    gmac = [r for r in records if r["kind"] == "gmac"]
    if gmac:
        lines += ["", f"## GMAC per second of audio (fp32 forward of {gmac[0]['seconds']:g} s)", "",
                  "| model | params | GMAC/s | of which scan |", "|---|---|---|---|"]
        for r in gmac:
            if r["status"] == "ok":
                lines.append(f"| {r['model']} | {r['params'] / 1e6:.3f}M | {r['gmac_per_s']:.2f} | "
                             f"{r['scan_gmac_per_s']:.2f} |")
            else:
                lines.append(f"| {r['model']} | - | {r['status']} | - |")
        lines += ["", "Scan formula: 9*B*E*N*L flops + B*E*L each for softplus(dt), D skip, z gate; the Mamba "
                  "mixers' depthwise convolution 2*B*L*E*K; matmuls and other convolutions as FlopCounterMode "
                  "counts them; other elementwise ops (norms, activations) not counted. GMAC = flops / 2."]
    lines += _sepmamba_paper_lines(table, records, models, lengths, dtypes)
    anchors = {name: anchor for name, anchor in anchors.items() if name in models}
    if anchors:
        lines += ["", "## Against the anchors (kernels.md; H100, 2026-11-23, mamba-ssm kernels, another run)", "",
                  "This run / anchor, time and memory (inference fp32 batch 1; training 4 s batch 1):", "",
                  "| model | anchor file | " + " | ".join(f"infer {s:g} s" for s in (1, 4, 16, 60))
                  + " | train fp32 | train bf16 |", "|---" * 8 + "|"]
        for name, anchor in anchors.items():
            cells = []
            for seconds in (1, 4, 16, 60):
                ref = anchor["infer"].get(float(seconds))
                cells.append(_anchor_ratio(table, name, "infer", "fp32", seconds, ref))
            for dtype in ("fp32", "bf16"):
                cells.append(_anchor_ratio(table, name, "train", dtype, 4, anchor["train"].get(dtype)))
            lines.append(f"| {name} | {anchor['source']} | " + " | ".join(cells) + " |")
    skipped = [r for r in records if r["status"] in ("skipped", "error")]
    if skipped:
        lines += ["", "## Not measured", ""]
        lines += [f"- {describe(r)}" for r in skipped]
    return "\n".join(lines) + "\n"


def _sepmamba_paper_lines(table: Table, records: List[dict], models: List[str], lengths: List[float],
                          dtypes: List[str]) -> List[str]:
    """SepMamba S and M beside the paper's figures: parameters, GMAC/s, inference time and memory vs length."""
    rows = [m for m in models if m in SEPMAMBA_PAPER]
    if not rows:
        return []
    gmac = {r["model"]: r for r in records if r["kind"] == "gmac" and r["status"] == "ok"}
    lines = ["", "## SepMamba beside its paper (Avenstrup et al., arXiv 2410.20997; models.md)", "",
             "The paper gives one forward time and one memory figure per model without their protocol (input "
             "length, precision, GPU); this run gives inference time / peak memory at batch 1 for each length.", "",
             "| model | dtype | params (paper) | GMAC/s (paper) | " + " | ".join(f"{s:g} s" for s in lengths)
             + " | paper: forward / memory |", "|---" * (len(lengths) + 5) + "|"]
    for model in rows:
        paper = SEPMAMBA_PAPER[model]
        ours = gmac.get(model)
        params = f"{ours['params'] / 1e6:.3f}M" if ours else "-"
        per_s = f"{ours['gmac_per_s']:.2f}" if ours else "-"
        for dtype in dtypes:
            lines.append(f"| {model} | {dtype} | {params} ({paper['params_m']}M) | {per_s} ({paper['gmac_per_s']}) | "
                         + " | ".join(cell(table.get(model, "infer", dtype, s)) for s in lengths)
                         + f" | {paper['forward_ms']} ms / {paper['memory_gb']} GB |")
    return lines


def _anchor_ratio(table: Table, model: str, kind: str, dtype: str, seconds: float, ref: Optional[dict]) -> str:
    if ref is None:
        return "-"
    time_ms = table.value(model, kind, dtype, seconds, 1, "time_ms")
    memory = table.value(model, kind, dtype, seconds, 1, "mem_mib")
    return (f"{fmt_ratio(None if time_ms is None else time_ms / ref['ms'])} / "
            f"{fmt_ratio(None if memory is None else memory / ref['peak_MiB'])}")


def report(out: Path, meta: dict, records: List[dict], anchors_dir: Path) -> None:
    """Plots and summary.md from the records."""
    for path in plot(out, records):
        print(f"wrote {path}")
    (out / "summary.md").write_text(summary(meta, records, load_anchors(anchors_dir)))
    print(f"wrote {out / 'summary.md'}")


# ----------------------------------------------------------------------------- main
def parse_list(text: str, cast=str) -> list:
    return [cast(item) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated hparams/<name>.yaml stems; "
                        "name:key=value[:key=value] overrides the file's hparams "
                        "(e.g. dpmamba_m:checkpoint_blocks=true)")
    parser.add_argument("--lengths", help=f"inference lengths in seconds (default {','.join(map(str, LENGTHS))})")
    parser.add_argument("--dtypes", help="fp32 and/or bf16 (autocast); default both on CUDA, fp32 on the CPU "
                        "(where bf16 autocast is 5-20x slower than fp32)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="what to measure: infer, train and/or gmac")
    parser.add_argument("--train-seconds", type=float, help="training segment length (default 4)")
    parser.add_argument("--flops-seconds", type=float, help="input length of the GMAC count (default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="timed calls per point (default 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget of the measurements; later points are skipped")
    parser.add_argument("--scan-backend", help="sets SPEECHBRAIN_MAMBA_SCAN_BACKEND (default: as set, else auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "models")
    parser.add_argument("--anchors", type=Path, default=ANCHORS_DIR)
    parser.add_argument("--quick", action="store_true",
                        help="script check: defaults become 0.25 and 0.5 s, training and GMAC at 0.25 s, 1 repeat")
    parser.add_argument("--plot-only", type=Path, metavar="RESULTS_JSON",
                        help="only redo plots and summary.md (into --out) from a results.json")
    args = parser.parse_args()

    if args.plot_only:
        saved = json.loads(args.plot_only.read_text())
        report(args.out, saved["meta"], saved["points"], args.anchors)
        return
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device(args.device)
    models = parse_list(args.models)
    unknown = [m for m in models if not (HPARAMS_DIR / f"{parse_model(m)[0]}.yaml").exists()]
    dtypes = parse_list(args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32"))
    if unknown or any(d not in DTYPES for d in dtypes):
        parser.error(f"unknown model(s) {unknown} or dtype(s) {dtypes}")
    if args.scan_backend:
        from speechbrain_mamba.ops import BACKEND_ENV_VAR

        os.environ[BACKEND_ENV_VAR] = args.scan_backend
    if args.threads:
        torch.set_num_threads(args.threads)
    import speechbrain  # noqa: F401  (its import sets the TF32 flags: record them as the models run)

    meta = {
        "machine": machine_description(torch.get_num_threads(), device),
        "device": str(device),
        "torch": torch.__version__,
        "scan_backend": scan_backend(device),
        "tf32": tf32_flags(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "budget_s": args.budget_s,
        "sample_rate": SAMPLE_RATE,
    }
    print(f"# {meta['machine']}; device {device}; scan backend {meta['scan_backend']}; {meta['tf32']}", flush=True)
    kinds = parse_list(args.kinds)
    if any(kind not in KINDS for kind in kinds):
        parser.error(f"--kinds: expected some of {', '.join(KINDS)}; got {args.kinds}")
    points = plan(models, parse_list(args.lengths, float), dtypes, args.train_seconds, args.flops_seconds, kinds)
    runner = Runner(args, device)
    runner.run(points, args.out, meta)
    report(args.out, meta, runner.records, args.anchors)


if __name__ == "__main__":
    main()
