"""Helpers shared by the benchmark scripts: machine description, model loading,
the timed inference and training steps, and peak-memory probes.

The scripts run as ``python benchmarks/<script>.py`` from the repository root,
so this module is imported by its plain name (``benchmarks/`` is on sys.path).
"""

import cProfile
import importlib.util
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Callable, ContextManager, Dict, List, Optional, TextIO, Tuple, Union

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
HPARAMS_DIR = REPO_ROOT / "hparams"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE_RATE = 8000
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast


def machine_description(threads: Optional[int] = None, device: Optional[torch.device] = None) -> str:
    """One line naming the CPU (and GPU), thread count and library versions."""
    parts = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"]
    if threads is not None:
        parts.append(f"{threads} threads")
    if device is not None and device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    parts.append(f"torch {torch.__version__}")
    try:
        import triton

        parts.append(f"Triton {triton.__version__}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def tf32_flags() -> str:
    """Whether fp32 matmuls/convolutions may use TF32 (SpeechBrain enables both on import)."""
    return (
        f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
    )


def scan_backend(device: torch.device) -> str:
    """The selective-scan backend a model on ``device`` resolves to (env var or auto)."""
    from speechbrain_mamba.ops import resolve_backend

    try:
        return resolve_backend(torch.empty(1, 1, 1, device=device))
    except ValueError as error:  # e.g. a backend named in the env var that is not installed
        return f"invalid ({error})"


def load_model(
    hparams_file: Path, device: torch.device, overrides: Union[Dict[str, object], str, None] = None
) -> Tuple[torch.nn.ModuleDict, int, Dict[str, object]]:
    """Builds a model file's ``modules`` with random weights on ``device``.

    ``overrides``: a dict or YAML text, as ``load_hyperpyyaml`` takes them.

    Returns the modules, ``num_spks`` and the whole hparams dictionary.
    """
    # Read as a file: its ``!include:`` paths (the recipes include the model files) resolve against its folder.
    with open(hparams_file) as stream:
        return modules_from_yaml(stream, device, overrides)


def load_module(path: Union[str, Path]) -> ModuleType:
    """A copy of a module (an earlier commit's kernels, an ablated variant) loaded from its file, beside the
    package's own: Triton reads kernels' source from their file, so variants are compared as files."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"copy_of_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def modules_from_yaml(
    yaml: Union[str, TextIO], device: torch.device, overrides: Union[Dict[str, object], str, None] = None
) -> Tuple[torch.nn.ModuleDict, int, Dict[str, object]]:
    """:func:`load_model` from the hparams' YAML text or an open file."""
    from hyperpyyaml import load_hyperpyyaml

    hparams = load_hyperpyyaml(yaml, overrides or {})
    modules = torch.nn.ModuleDict(hparams["modules"]).to(device)
    return modules, int(hparams["num_spks"]), hparams


def parse_model(spec: str) -> Tuple[str, str]:
    """``dpmamba_m`` or a variant ``dpmamba_m:checkpoint_blocks=true`` -> (hparams stem, YAML overrides)."""
    stem, *settings = spec.split(":")
    return stem, "\n".join(setting.replace("=", ": ", 1) for setting in settings)


def count_parameters(modules: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in modules.parameters() if p.requires_grad)


def random_batch(
    batch: int, samples: int, num_spks: int, device: torch.device, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random mixture [batch, samples] and its sources [batch, samples, num_spks]."""
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randn(batch, samples, num_spks, generator=generator).to(device)
    return sources.sum(-1), sources


def autocast(device: torch.device, dtype: str) -> ContextManager:
    """bf16 autocast for ``"bf16"``, nothing for ``"fp32"``."""
    if DTYPES[dtype] is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def inference_step(
    modules: torch.nn.ModuleDict, num_spks: int, mixture: torch.Tensor, dtype: str
) -> Callable[[], None]:
    """One separation of ``mixture`` under inference mode; the output is dropped."""
    from speechbrain_mamba.separation.separator import separate_mixture

    modules.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(mixture.device, dtype):
            separate_mixture(modules, mixture, num_spks)

    return step


def training_step(
    modules: torch.nn.ModuleDict,
    num_spks: int,
    mixture: torch.Tensor,
    sources: torch.Tensor,
    dtype: str,
    optimizer: torch.optim.Optimizer,
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Callable[[], None]:
    """Forward + PIT negative SI-SNR (SpeechBrain's) + backward + optimizer step.

    ``forward`` (default: ``separate_mixture`` of ``modules``) maps the
    mixture to the estimates, e.g. a
    :class:`~speechbrain_mamba.utils.cuda_graphs.TrainingCUDAGraphs`.
    Gradients are released (``set_to_none``) at the end of the step, so they
    count in its peak memory; the optimizer state, created by the first
    (warm-up) step, does not.
    """
    from speechbrain.nnet.losses import get_si_snr_with_pitwrapper

    from speechbrain_mamba.separation.separator import SeparationForward

    modules.train()
    if forward is None:
        forward = SeparationForward(modules, num_spks)

    def step() -> None:
        with autocast(mixture.device, dtype):
            estimates = forward(mixture).float()
        loss = get_si_snr_with_pitwrapper(sources, estimates).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_and_memory(
    step: Callable[[], None],
    device: torch.device,
    warmup: int,
    repeats: int,
    deadline: Optional[float] = None,
) -> Tuple[List[float], Optional[float]]:
    """Runs ``step`` ``warmup`` times, then times ``repeats`` calls.

    CUDA: CUDA events around each call; memory = the largest
    ``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
    ``memory_allocated()`` before the call, in MiB. CPU: wall clock, no memory
    (None). With a ``deadline`` (``time.monotonic()`` value), fewer repeats
    (at least one) are made when the warm-up shows that all would pass it.
    Returns the per-call times in ms and the memory.
    """
    warmup_start = time.monotonic()
    for _ in range(warmup):
        step()
    synchronize(device)
    if deadline is not None and warmup:
        per_call = (time.monotonic() - warmup_start) / warmup
        repeats = max(1, min(repeats, int((deadline - time.monotonic()) / max(per_call, 1e-6))))
    times, peak = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            used = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            peak = used if peak is None else max(peak, used)
        else:
            start_s = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - start_s))
    return times, peak


def back_to_back_ms(step: Callable[[], object], calls: int) -> float:
    """ms of wall time per call, ``calls`` issued back to back then one CUDA synchronisation: when the GPU
    keeps up, what the host pays per call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / calls


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: List[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Resets the process's peak RSS (Linux >= 4.0) and returns the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_kib("VmRSS")


def cprofile_calls(call: Callable[[], object], calls: int) -> cProfile.Profile:
    """A Python profile of ``calls`` calls of ``call`` on the GPU, synchronised before it stops."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    profiler.disable()
    return profiler
