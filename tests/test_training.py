"""Training with the separation Brain and the recipe: robust steps, resuming, precision, bad input.

The recipe runs are subprocesses of ``recipes/WSJ0Mix/separation/train.py`` with the tiny model of
``tests/hparams/tiny_separation.yaml`` on a tiny synthetic corpus, every output under pytest's tmp_path
(the subprocesses also run there, so that nothing relative to the working directory lands in the repository).
"""

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import soundfile as sf
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.core import INTRA_EPOCH_CKPT_FLAG
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.nnet.schedulers import ReduceLROnPlateau
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.epoch_loop import EpochCounter
from speechbrain.utils.train_logger import FileTrainLogger

from speechbrain_mamba.separation.brain import Separation
from speechbrain_mamba.separation.metrics import separation_scores
from speechbrain_mamba.separation.schedulers import WarmupCosineScheduler
from speechbrain_mamba.utils.cuda_graphs import TrainingCUDAGraphs

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO_ROOT / "recipes" / "WSJ0Mix" / "separation" / "train.py"
TINY_HPARAMS = REPO_ROOT / "tests" / "hparams" / "tiny_separation.yaml"
RATE = 8000
RUN_TIMEOUT = 300  # seconds, for one recipe run (5-15 s on a 2-core CPU)


# ----------------------------------------------------------------------------------------------------------------
# A tiny corpus: wsj0-2mix layout (2 mixtures of 0.25 s per split) and single-speaker utterances for dynamic mixing.
# ----------------------------------------------------------------------------------------------------------------


def _voice(rng: np.random.Generator, f0: float, length: int) -> np.ndarray:
    """A harmonic 'voice' with a syllable-like envelope and a little noise, peak about 0.3."""
    t = np.arange(length) / RATE
    f0_track = f0 * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0_track) / RATE
    wave = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi)) ** 2
    wave = wave * envelope + 0.02 * rng.standard_normal(length)
    return 0.3 * wave / np.abs(wave).max()


def write_tiny_corpus(root: Path, mixture_len: int = 2000, utterance_len: int = 3000) -> Dict[str, Path]:
    """``root/wsj0-mix/2speakers/wav8k/min/{tr,cv,tt}/{mix,s1,s2}`` and ``root/wsj0/si_tr_s/<spk>/<spk>NN.wav``."""
    rng = np.random.default_rng(0)
    speakers = {f"s{i:02d}": 100.0 + 37.0 * i for i in range(6)}  # speaker id (3 characters) -> f0
    dm_folder = root / "wsj0" / "si_tr_s"
    for spk, f0 in speakers.items():
        for utt in range(2):
            path = dm_folder / spk / f"{spk}{utt:02d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _voice(rng, f0, utterance_len), RATE, subtype="PCM_16")
    data_folder = root / "wsj0-mix"
    split_root = data_folder / "2speakers" / "wav8k" / "min"
    for split in ("tr", "cv", "tt"):
        for index in range(2):
            spk1, spk2 = rng.choice(sorted(speakers), 2, replace=False)
            sources = [_voice(rng, speakers[spk], mixture_len) for spk in (spk1, spk2)]
            sources = [np.round(s * 32767) / 32767 for s in sources]  # exact in 16-bit PCM
            name = f"{spk1}{index:02d}_0.5_{spk2}{index:02d}_-0.5"
            for sub, wave in (("s1", sources[0]), ("s2", sources[1]), ("mix", sources[0] + sources[1])):
                path = split_root / split / sub / f"{name}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, wave, RATE, subtype="PCM_16")
    return {"data_folder": data_folder, "dm_folder": dm_folder}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, Path]:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


# ----------------------------------------------------------------------------------------------------------------
# Running the recipe
# ----------------------------------------------------------------------------------------------------------------


def recipe_command(output_folder: Path, corpus: Optional[Dict[str, Path]], *extra: str) -> List[str]:
    command = [sys.executable, str(TRAIN_PY), str(TINY_HPARAMS), "--output_folder", str(output_folder)]
    if corpus is not None:
        command += ["--data_folder", str(corpus["data_folder"]), "--dm_folder", str(corpus["dm_folder"])]
    return command + ["--noprogressbar", *extra]


def recipe_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"  # the tiny model gains nothing from threads; spinning ones are slow on a busy CPU
    return env


def run_recipe(command: List[str], cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs the recipe in ``cwd`` (a tmp_path); stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        command, cwd=cwd, env=recipe_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )


def logged_epochs(train_log: Path) -> List[Dict[str, float]]:
    """The epoch lines of a SpeechBrain train_log.txt as {"epoch": ..., "lr": ..., "train si-snr": ...}."""
    epochs = []
    for line in train_log.read_text().splitlines():
        if not line.startswith("epoch: "):
            continue
        fields = {}
        for part in re.split(r", | - ", line):
            key, value = part.rsplit(": ", 1)
            fields[key] = float(value)
        epochs.append(fields)
    return epochs


# ----------------------------------------------------------------------------------------------------------------
# fit_batch: non-finite items and the loss threshold (unit tests with a fake model)
# ----------------------------------------------------------------------------------------------------------------

NAN_MARK = 123.0  # a mixture starting with this sample makes the fake model output NaN for that item


class FakeSeparator(torch.nn.Module):
    """[B, T] -> [B, T, 2]: two learnable FIR filters of the mixture. The NaN of a marked item comes out of a
    differentiable path (as an overflow would), so that it reaches the gradient unless the item is left out."""

    def __init__(self):
        super().__init__()
        self.filters = torch.nn.Parameter(0.3 * torch.randn(2, 1, 9, generator=torch.Generator().manual_seed(1)))

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        estimates = F.conv1d(mixture[:, None], self.filters, padding=4).transpose(1, 2)
        poison = torch.where(mixture[:, :1, None] == NAN_MARK, float("nan"), 1.0)
        return estimates * poison


def make_brain(model: torch.nn.Module, loss_threshold: Optional[float] = -40.0, device: str = "cpu",
               optimizer=lambda params: torch.optim.Adam(params, lr=1e-2), **hparams) -> Separation:
    hparams = {"num_spks": 2, "loss_threshold": loss_threshold,
               "lr_step_scheduler": WarmupCosineScheduler(1e-2, warmup_steps=0, total_steps=100), **hparams}
    brain = Separation({"model": model}, optimizer, hparams, run_opts={"device": device, "noprogressbar": True})
    brain.on_fit_start()  # optimizer (no checkpointer)
    brain.on_stage_start(sb.Stage.TRAIN, epoch=1)
    brain.modules.train()
    brain.step = 1  # as Brain._fit_train numbers the batches
    return brain


def make_items(count: int, length: int = 400, seed: int = 0) -> List[dict]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        sources = torch.randn(length, 2, generator=generator)
        items.append({"id": f"utt{i}", "mixture": sources.sum(-1), "sources": sources})
    return items


def oracle_si_snr(estimate: np.ndarray, target: np.ndarray) -> float:
    """SI-SNR (dB) from its definition, in float64."""
    estimate, target = estimate - estimate.mean(), target - target.mean()
    projection = (estimate @ target) / (target @ target) * target
    return 10 * math.log10((projection @ projection) / ((estimate - projection) @ (estimate - projection)))


def oracle_pit_loss(estimates: torch.Tensor, sources: torch.Tensor) -> float:
    """Negative SI-SNR of one item [T, 2] under its best permutation."""
    est, src = estimates.double().numpy(), sources.double().numpy()
    return -max(
        (oracle_si_snr(est[:, 0], src[:, a]) + oracle_si_snr(est[:, 1], src[:, b])) / 2 for a, b in ((0, 1), (1, 0))
    )


def parameters(brain: Separation) -> List[torch.Tensor]:
    return [p.detach().clone() for p in brain.modules.parameters()]


def test_fit_batch_drops_nonfinite_items_and_steps_on_the_others():
    items = make_items(3)
    items[1]["mixture"][0] = NAN_MARK
    model = FakeSeparator()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        finite = (items[0], items[2])
        expected_loss = np.mean([oracle_pit_loss(model(it["mixture"][None])[0], it["sources"]) for it in finite])
    brain = make_brain(model)
    before = parameters(brain)

    loss = brain.fit_batch(PaddedBatch(items))

    after = parameters(brain)
    assert brain.nonfinite_items == 1 and brain.skipped_batches == 0 and brain.solved_items == 0
    assert brain.optimizer_step == 1 and brain.hparams.lr_step_scheduler.step_count == 1
    assert float(loss) == pytest.approx(expected_loss, abs=1e-4)
    assert all(torch.isfinite(p).all() for p in after), "a NaN item poisoned the parameters"
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no optimizer step"
    # The step is the one of the finite items alone.
    reference = make_brain(twin)
    reference_loss = reference.fit_batch(PaddedBatch([items[0], items[2]]))
    assert float(reference_loss) == pytest.approx(float(loss), abs=1e-6)
    for got, want in zip(after, parameters(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_fit_batch_with_every_item_nonfinite_is_skipped():
    items = make_items(2)
    for item in items:
        item["mixture"][0] = NAN_MARK
    brain = make_brain(FakeSeparator())
    before = parameters(brain)
    loss = brain.fit_batch(PaddedBatch(items))
    assert math.isnan(float(loss))
    assert brain.nonfinite_items == 2 and brain.skipped_batches == 1 and brain.optimizer_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(brain)))
    assert all(p.grad is None or not p.grad.any() for p in brain.modules.parameters())


def test_fit_batch_skip_under_gradient_accumulation():
    """Accumulating over 2 micro-batches: a skipped first micro-batch leaves the step to the second alone; a
    skipped second one (the step) drops the window's gradients instead of stepping on unsynchronised ones."""
    items = make_items(2)
    nan_items = make_items(1)
    nan_items[0]["mixture"][0] = NAN_MARK
    model = FakeSeparator()
    twin, third = copy.deepcopy(model), copy.deepcopy(model)

    brain = make_brain(model)
    brain.grad_accumulation_factor = 2
    assert math.isnan(float(brain.fit_batch(PaddedBatch(nan_items))))  # micro-batch 1: skipped
    brain.step = 2
    brain.fit_batch(PaddedBatch(items))  # micro-batch 2: steps on its own gradient
    assert brain.skipped_batches == 1 and brain.optimizer_step == 1
    reference = make_brain(twin)
    reference.grad_accumulation_factor = 2
    reference.step = 2
    reference.fit_batch(PaddedBatch(items))
    for got, want in zip(parameters(brain), parameters(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)

    dropped = make_brain(third)
    dropped.grad_accumulation_factor = 2
    dropped.fit_batch(PaddedBatch(items))  # micro-batch 1: accumulates
    assert any(p.grad is not None and p.grad.any() for p in dropped.modules.parameters())
    dropped.step = 2
    assert math.isnan(float(dropped.fit_batch(PaddedBatch(nan_items))))  # the step's micro-batch: skipped
    assert dropped.optimizer_step == 0
    assert all(p.grad is None or not p.grad.any() for p in dropped.modules.parameters())


def solved_items(model: torch.nn.Module, count: int, solved: List[bool]) -> List[dict]:
    """Items whose sources are the model's own output (swapped) plus a little noise, so that their SI-SNR
    is far above 40 dB, or, where not ``solved``, independent sources."""
    items = make_items(count, seed=3)
    with torch.no_grad():
        for item, is_solved in zip(items, solved):
            if is_solved:
                estimates = model(item["mixture"][None])[0].flip(-1)
                noise = torch.randn(estimates.shape, generator=torch.Generator().manual_seed(4))
                item["sources"] = estimates + 1e-4 * noise
    return items


def test_fit_batch_already_solved_batch_is_skipped_without_a_step():
    model = FakeSeparator()
    items = solved_items(model, 2, [True, True])
    with torch.no_grad():
        assert all(oracle_pit_loss(model(it["mixture"][None])[0], it["sources"]) < -40 for it in items)
    brain = make_brain(model)
    before = parameters(brain)
    loss = brain.fit_batch(PaddedBatch(items))
    assert math.isnan(float(loss))
    assert brain.solved_items == 2 and brain.skipped_batches == 1 and brain.nonfinite_items == 0
    assert brain.optimizer_step == 0 and brain.hparams.lr_step_scheduler.step_count == 0
    assert brain.optimizer.state_dict()["state"] == {}, "Adam state changed without a step"
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(brain)))


def test_fit_batch_solved_items_leave_the_mean():
    model = FakeSeparator()
    twin = copy.deepcopy(model)
    items = solved_items(model, 3, [False, True, False])
    brain = make_brain(model)
    loss = brain.fit_batch(PaddedBatch(items))
    assert brain.solved_items == 1 and brain.skipped_batches == 0 and brain.optimizer_step == 1
    reference = make_brain(twin)
    assert float(reference.fit_batch(PaddedBatch([items[0], items[2]]))) == pytest.approx(float(loss), abs=1e-6)
    for got, want in zip(parameters(brain), parameters(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # Without a threshold the solved item counts in the mean.
    unthresholded = make_brain(copy.deepcopy(twin), loss_threshold=None)
    unthresholded.fit_batch(PaddedBatch(items))
    assert unthresholded.solved_items == 0
    assert any(not torch.equal(a, b) for a, b in zip(parameters(unthresholded), parameters(reference)))


def test_cuda_graphs_need_a_cuda_device_and_no_accumulation_and_leave_cpu_training_unchanged():
    with pytest.raises(ValueError, match="cuda_graphs: True needs a CUDA device"):
        make_brain(FakeSeparator(), cuda_graphs=True)
    with pytest.raises(ValueError, match="grad_accumulation_factor > 1"):
        brain = Separation({"model": FakeSeparator()}, lambda params: torch.optim.Adam(params), {"num_spks": 2,
                           "cuda_graphs": True}, run_opts={"device": "cpu", "grad_accumulation_factor": 2})
        brain.on_fit_start()
    graphed = TrainingCUDAGraphs(FakeSeparator(), min_calls=1)
    mixture = torch.randn(2, 400)
    torch.testing.assert_close(graphed(mixture), graphed.module(mixture))  # off CUDA: the module itself
    assert len(graphed) == 0
    with pytest.raises(ValueError, match="max_graphs, min_calls and warmup"):
        TrainingCUDAGraphs(FakeSeparator(), min_calls=0)


# ----------------------------------------------------------------------------------------------------------------
# Validation of a diverged model; training crops (unit tests with the fake model)
# ----------------------------------------------------------------------------------------------------------------


class DivergingSeparation(Separation):
    """Outputs NaN in validation from epoch 2 on, as a model that diverged during epoch 2 would."""

    def compute_forward(self, mixture: torch.Tensor) -> torch.Tensor:
        estimates = super().compute_forward(mixture)
        if not self.modules.training and self.hparams.epoch_counter.current >= 2:
            return estimates * float("nan")
        return estimates


def test_nonfinite_validation_never_becomes_the_best_checkpoint(tmp_path):
    model, counter = FakeSeparator(), EpochCounter(2)
    checkpointer = Checkpointer(tmp_path / "save", {"model": model, "counter": counter})
    plateau = ReduceLROnPlateau(factor=0.5, patience=0, dont_halve_until_epoch=0)
    hparams = {"num_spks": 2, "epoch_counter": counter, "lr_epoch_scheduler": plateau,
               "train_logger": FileTrainLogger(tmp_path / "train_log.txt")}
    brain = DivergingSeparation({"model": model}, lambda params: torch.optim.Adam(params, lr=1e-3), hparams,
                                run_opts={"device": "cpu", "noprogressbar": True}, checkpointer=checkpointer)
    loader = {"batch_size": 2, "collate_fn": PaddedBatch}
    brain.fit(counter, make_items(4), make_items(2, seed=1), train_loader_kwargs=loader, valid_loader_kwargs=loader)

    best = checkpointer.find_checkpoint(min_key="si-snr")
    assert (best.path / "counter.ckpt").read_text().strip() == "1" and math.isfinite(best.meta["si-snr"])
    assert brain.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # the plateau scheduler saw no improvement
    epochs = logged_epochs(tmp_path / "train_log.txt")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[0]["valid si-snr"] == pytest.approx(best.meta["si-snr"], rel=1e-2)
    assert epochs[0]["valid nonfinite_items"] == 0
    assert epochs[1]["valid si-snr"] == math.inf and epochs[1]["valid nonfinite_items"] == 2


def test_training_crops_stay_inside_each_item_and_are_reproducible():
    window, lengths = 100, [400, 160, 60]
    items = make_items(3, length=400)
    for item, length in zip(items, lengths):
        item["mixture"], item["sources"] = item["mixture"][:length], item["sources"][:length]
    batch = PaddedBatch(items)  # padded to 400
    counter = EpochCounter(5)
    counter.current = 2
    brain = make_brain(FakeSeparator(), training_signal_len=window, seed=7, epoch_counter=counter)

    def crops(brain: Separation, steps) -> Dict[int, List[int]]:
        """step -> the start of each item's window, found in the item itself."""
        starts = {}
        for step in steps:
            brain.step = step
            mixture, sources = brain._mixture_and_sources(batch, sb.Stage.TRAIN)
            assert mixture.shape == (3, window) and sources.shape == (3, window, 2)
            starts[step] = []
            for i, item in enumerate(items):
                if len(item["mixture"]) < window:  # shorter than the window: all of it, then padding
                    assert torch.equal(mixture[i, : len(item["mixture"])], item["mixture"])
                    assert torch.equal(sources[i, : len(item["mixture"])], item["sources"])
                    starts[step].append(0)
                    continue
                windows = item["mixture"].unfold(0, window, 1)  # every window inside the item
                (start,) = (windows == mixture[i]).all(-1).nonzero()[:, 0].tolist()
                assert torch.equal(sources[i], item["sources"][start : start + window])
                starts[step].append(start)
        return starts

    first = crops(brain, range(1, 31))
    assert len({tuple(starts) for starts in first.values()}) > 20  # random windows
    torch.manual_seed(0)  # the global RNG plays no part: a resumed run crops the same windows
    again = crops(make_brain(FakeSeparator(), training_signal_len=window, seed=7, epoch_counter=counter), [3, 17])
    assert again == {3: first[3], 17: first[17]}
    counter.current = 3
    assert crops(brain, range(1, 31)) != first  # another epoch, other windows


class ScriptedSeparation(Separation):
    """Returns the estimates queued in ``outputs``, one batch at a time."""

    outputs: List[torch.Tensor] = []

    def compute_forward(self, mixture: torch.Tensor) -> torch.Tensor:
        return self.outputs.pop(0)


def test_unscorable_test_utterances_get_nan_and_stay_out_of_the_average(tmp_path, caplog):
    items = make_items(3, length=4000, seed=2)
    items[1]["sources"][:, 1] = 0  # a silent reference source: BSS-eval's matrix is singular
    items[1]["mixture"] = items[1]["sources"].sum(-1)
    noise = 0.1 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
    silent_estimate = items[2]["sources"].clone()
    silent_estimate[:, 1] = 0  # SDR -inf
    hparams = {"num_spks": 2, "output_folder": str(tmp_path), "epoch_counter": EpochCounter(1),
               "train_logger": FileTrainLogger(tmp_path / "train_log.txt")}
    brain = ScriptedSeparation({"model": FakeSeparator()}, None, hparams, run_opts={"device": "cpu"})
    brain.outputs = [(items[0]["sources"] + noise)[None], noise[None], silent_estimate[None]]
    brain.on_stage_start(sb.Stage.TEST)
    for item in items:
        brain.evaluate_batch(PaddedBatch([item]), sb.Stage.TEST)
    brain.on_stage_end(sb.Stage.TEST, 0.0)

    results = read_test_results(tmp_path / "test_results.csv")
    assert list(results) == ["utt0", "utt1", "utt2", "avg"]
    assert all(math.isnan(value) for value in results["utt1"])
    assert results["utt2"][0] == -math.inf and math.isfinite(results["utt2"][2])
    finite = [separation_scores(item["mixture"], item["sources"], estimate)
              for item, estimate in ((items[0], items[0]["sources"] + noise), (items[2], silent_estimate))]
    expected_avg = [finite[0]["sdr"], finite[0]["sdr_i"], (finite[0]["si-snr"] + finite[1]["si-snr"]) / 2,
                    (finite[0]["si-snr_i"] + finite[1]["si-snr_i"]) / 2]
    assert results["avg"] == pytest.approx(expected_avg, abs=1e-4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(message.startswith("utt1: no scores (LinAlgError") for message in warnings), warnings
    assert any("sdr 2, sdr_i 2, si-snr 1, si-snr_i 1" in message for message in warnings), warnings


# ----------------------------------------------------------------------------------------------------------------
# Resuming: a run killed in the middle of an epoch continues from its last checkpoint, as if never stopped
# ----------------------------------------------------------------------------------------------------------------

MIXTURES_PER_EPOCH = 12
CKPT_INTERVAL_STEPS = 5  # intra-epoch checkpoints after batches 5 and 10 of every epoch
CRASH_EPOCH, CRASH_STEP = 2, 7  # SIGKILL after batch 7 of epoch 2: the last checkpoint is the one after batch 5
# The recipe's main() with a Brain that kills its own process (SIGKILL: no cleanup) after a given batch.
CRASHING_MAIN = """
import os, signal, sys
from speechbrain_mamba.separation import recipe

class CrashingSeparation(recipe.Separation):
    def fit_batch(self, batch):
        loss = super().fit_batch(batch)
        if (self.hparams.epoch_counter.current, self.step) == ({epoch}, {step}):
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

recipe.Separation = CrashingSeparation
recipe.main()
"""


def lr_after(steps: int, peak: float = 1e-3, warmup: int = 2, total: int = 3 * MIXTURES_PER_EPOCH) -> float:
    """The warmup-cosine schedule of tests/hparams/tiny_separation.yaml, written out independently."""
    if steps <= warmup:
        return peak * steps / warmup
    progress = min(1.0, (steps - warmup) / (total - warmup))
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoints(save_folder: Path) -> Dict[str, float]:
    """CKPT folder name -> modification time of its masknet parameters."""
    return {ckpt.name: (ckpt / "masknet.ckpt").stat().st_mtime for ckpt in save_folder.glob("CKPT+*")}


def read_test_results(path: Path) -> Dict[str, List[float]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    assert rows[0] == ["snt_id", "sdr", "sdr_i", "si-snr", "si-snr_i"]
    return {row[0]: [float(x) for x in row[1:]] for row in rows[1:]}


def test_resume_after_a_crash_mid_epoch_matches_an_uninterrupted_run(corpus, tmp_path):
    options = ["--mixtures_per_epoch", str(MIXTURES_PER_EPOCH), "--ckpt_interval_steps", str(CKPT_INTERVAL_STEPS)]
    reference_out, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = run_recipe(recipe_command(reference_out, corpus, *options), tmp_path)
    assert reference.returncode == 0, reference.stdout[-3000:]

    command = recipe_command(out, corpus, *options)
    crashing = [sys.executable, "-c", CRASHING_MAIN.format(epoch=CRASH_EPOCH, step=CRASH_STEP)] + command[2:]
    crashed = run_recipe(crashing, tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-3000:]
    assert [e["epoch"] for e in logged_epochs(out / "train_log.txt")] == [1]
    assert not (out / "test_results.csv").exists()
    intra = [c for c in (out / "save").glob("CKPT+*") if INTRA_EPOCH_CKPT_FLAG in (c / "CKPT.yaml").read_text()]
    assert len(intra) == 1 and (intra[0] / "counter.ckpt").read_text().strip() == str(CRASH_EPOCH)

    resumed = run_recipe(command, tmp_path)  # the same command again
    log = resumed.stdout
    assert resumed.returncode == 0, log[-3000:]
    assert f"Loading a checkpoint from {intra[0]}" in log
    assert "Going into epoch 1\n" not in log and "Going into epoch 2\n" in log and "Going into epoch 3\n" in log
    epochs = logged_epochs(out / "train_log.txt")
    assert [e["epoch"] for e in epochs] == [1, 2, 3], "each epoch once in train_log.txt"
    for epoch in epochs:  # the schedule went on from the checkpointed step, and epoch 2 was not restarted
        assert epoch["lr"] == pytest.approx(lr_after(MIXTURES_PER_EPOCH * int(epoch["epoch"])), rel=5e-3)
        assert epoch["train skipped_batches"] == 0
    # Same data, same order, same state: the same numbers as without the crash (as logged, to 3-4 digits).
    reference_epochs = logged_epochs(reference_out / "train_log.txt")
    assert len(reference_epochs) == len(epochs)
    for got, want in zip(epochs, reference_epochs):
        assert got.keys() == want.keys()
        assert all(got[key] == pytest.approx(want[key], rel=2e-3, abs=0.011) for key in want), (got, want)
    results = read_test_results(out / "test_results.csv")
    expected = read_test_results(reference_out / "test_results.csv")
    assert list(results) == list(expected) and len(results) == 3  # 2 test mixtures and "avg"
    for key, values in expected.items():
        assert results[key] == pytest.approx(values, abs=1e-4)

    # A finished experiment run again evaluates, and does not train again.
    saved, train_log = checkpoints(out / "save"), (out / "train_log.txt").read_text()
    (out / "test_results.csv").unlink()
    again = run_recipe(command, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Going into epoch" not in again.stdout
    assert checkpoints(out / "save") == saved
    assert logged_epochs(out / "train_log.txt") == epochs
    assert (out / "train_log.txt").read_text().startswith(train_log)
    for key, values in read_test_results(out / "test_results.csv").items():
        assert values == pytest.approx(results[key], abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Precision: bf16 training through the recipe; evaluation in the training precision unless told otherwise
# ----------------------------------------------------------------------------------------------------------------


def precisions(log: str) -> tuple:
    train = re.findall(r"Using training precision: `--precision=(\w+)`", log)
    evaluation = re.findall(r"Using evaluation precision: `--eval_precision=(\w+)`", log)
    assert len(train) == 1 and len(evaluation) == 1, log[-3000:]
    return train[0], evaluation[0]


def test_bf16_training_through_the_recipe_evaluates_in_bf16(corpus, tmp_path):
    # precision from the hparams file, as in the DPMamba recipes (precision: bf16)
    hparams = tmp_path / "tiny_bf16.yaml"
    hparams.write_text(re.sub(r"(?m)^precision: fp32$", "precision: bf16", TINY_HPARAMS.read_text()))
    assert "precision: bf16" in hparams.read_text()
    out = tmp_path / "out"
    command = recipe_command(out, corpus, "--debug")
    command[2] = str(hparams)
    result = run_recipe(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert precisions(result.stdout) == ("bf16", "bf16")
    epochs = logged_epochs(out / "train_log.txt")
    assert [e["epoch"] for e in epochs] == [1, 2]  # --debug: 2 epochs of 2 batches
    assert all(math.isfinite(e["train si-snr"]) and math.isfinite(e["valid si-snr"]) for e in epochs)
    assert all(e["train skipped_batches"] == 0 and e["train nonfinite_items"] == 0 for e in epochs)
    results = read_test_results(out / "test_results.csv")
    assert len(results) == 3 and all(math.isfinite(x) for row in results.values() for x in row)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--precision", "bf16"], ("bf16", "bf16")),  # the command line's training precision
        (["--precision", "bf16", "--eval_precision", "fp32"], ("bf16", "fp32")),  # explicit evaluation precision
        ([], ("fp32", "fp32")),  # the hparams file's (fp32)
    ],
)
def test_evaluation_precision_follows_training_precision(corpus, tmp_path, flags, expected):
    debug = ["--debug", "--debug_epochs", "1", "--debug_batches", "1"]  # --test_only needs a checkpoint
    result = run_recipe(recipe_command(tmp_path / "out", corpus, *debug, *flags), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert precisions(result.stdout) == expected
    assert (tmp_path / "out" / "test_results.csv").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Bad input through the recipe entry: a clear error naming the file, exit status 2, no traceback
# ----------------------------------------------------------------------------------------------------------------

SPLIT_ROOT = Path("wsj0-mix/2speakers/wav8k/min")
# Runs recipe.main() on each case in one process (imports once); prints the outcome of each as JSON.
MAIN_PER_CASE = """
import json, sys
from speechbrain_mamba.separation.recipe import main
outcomes = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        main(argv)
        outcomes[name] = {"code": 0}
    except SystemExit as stop:
        outcomes[name] = {"code": stop.code, "cause": type(stop.__cause__).__name__, "message": str(stop.__cause__)}
    except Exception as error:
        outcomes[name] = {"code": None, "cause": type(error).__name__, "message": str(error)}
print("OUTCOMES " + json.dumps(outcomes))
"""


def _first(folder: Path) -> Path:
    return sorted(folder.glob("*.wav"))[0]


def _rewrite(path: Path, **changes) -> Path:
    """Rewrites a WAV with other properties: rate, channels, length, float samples with a NaN."""
    audio, rate = sf.read(path, dtype="float64")
    if "length" in changes:
        audio = audio[: changes["length"]]
    if changes.get("channels") == 2:
        audio = np.stack([audio, audio], axis=-1)
    subtype = "PCM_16"
    if changes.get("nan"):
        audio[len(audio) // 2] = np.nan
        subtype = "FLOAT"
    sf.write(path, audio, changes.get("rate", rate), subtype=subtype)
    return path


def bad_inputs(corpus: Dict[str, Path], root: Path) -> Dict[str, tuple]:
    """name -> (data_folder, dm_folder, path the error must name, phrase it must contain)."""
    cases = {}

    def broken_copy(name: str, relative: Path, **changes) -> None:
        copy_root = root / re.sub(r"\W+", "_", name)  # no ": " in paths: SpeechBrain passes overrides as YAML
        data_folder = Path(shutil.copytree(corpus["data_folder"], copy_root / "wsj0-mix"))
        dm_folder = Path(shutil.copytree(corpus["dm_folder"], copy_root / "si_tr_s"))
        base = dm_folder if relative.parts[0] == "dm" else data_folder.parent / SPLIT_ROOT
        target = _rewrite(_first(base.joinpath(*relative.parts[1:])), **changes)
        cases[name] = (data_folder, dm_folder, target, None)

    missing = root / "no_such_corpus"
    cases["missing data folder"] = (missing, corpus["dm_folder"], missing, "does not exist")
    (root / "empty").mkdir(parents=True)
    cases["empty data folder"] = (root / "empty", corpus["dm_folder"], root / "empty", "is empty")
    for split in ("train", "valid", "test"):  # the custom layout where wsj0-mix is expected
        for sub in ("mix", "s1", "s2"):
            (root / "custom" / split / sub).mkdir(parents=True)
    cases["wrong layout"] = (root / "custom", corpus["dm_folder"], root / "custom", "no wsj0-2mix split folders found")
    broken_copy("wrong sample rate", Path("x/tt/s2"), rate=16000)
    broken_copy("two channels", Path("x/cv/mix"), channels=2)
    broken_copy("NaN samples", Path("x/tr/s1"), nan=True)
    broken_copy("source shorter than its mixture", Path("x/tr/s2"), length=1500)
    broken_copy("dynamic mixing: wrong sample rate", Path("dm/s03"), rate=16000)
    broken_copy("dynamic mixing: two channels", Path("dm/s01"), channels=2)
    cases["dynamic mixing: missing folder"] = (corpus["data_folder"], root / "no_dm", root / "no_dm", "does not exist")
    phrases = {"wrong sample rate": "16000 Hz, expected 8000 Hz", "two channels": "2 channels, expected 1",
               "NaN samples": "NaN", "source shorter than its mixture": "1500 samples, expected 2000",
               "dynamic mixing: wrong sample rate": "16000 Hz, expected 8000 Hz",
               "dynamic mixing: two channels": "2 channels, expected 1"}
    return {name: (*case[:3], case[3] or phrases[name]) for name, case in cases.items()}


def test_bad_input_stops_with_a_clear_error(corpus, tmp_path):
    cases = bad_inputs(corpus, tmp_path / "inputs")
    argvs = {
        name: [str(TINY_HPARAMS), "--output_folder", str(tmp_path / "out" / f"case{i}"), "--noprogressbar",
               "--data_folder", str(data_folder), "--dm_folder", str(dm_folder)]
        for i, (name, (data_folder, dm_folder, _, _)) in enumerate(cases.items())
    }
    result = run_recipe([sys.executable, "-c", MAIN_PER_CASE, json.dumps(argvs)], tmp_path)
    assert result.returncode == 0 and "OUTCOMES " in result.stdout, result.stdout[-3000:]
    outcomes = json.loads(result.stdout.split("OUTCOMES ", 1)[1])
    for name, (_, _, culprit, phrase) in cases.items():
        outcome = outcomes[name]
        assert outcome["code"] == 2 and outcome["cause"] == "DataError", (name, outcome)
        assert str(culprit) in outcome["message"] and phrase in outcome["message"], (name, outcome["message"])
        assert "Going into epoch" not in (tmp_path / "out" / f"case{list(cases).index(name)}" / "log.txt").read_text()


def test_bad_input_on_the_command_line_gives_a_message_not_a_traceback(corpus, tmp_path):
    data_folder = Path(shutil.copytree(corpus["data_folder"], tmp_path / "wsj0-mix"))
    bad = _rewrite(_first(tmp_path / SPLIT_ROOT / "tt" / "s2"), rate=16000)
    command = recipe_command(tmp_path / "out", {"data_folder": data_folder, "dm_folder": corpus["dm_folder"]})
    result = run_recipe(command, tmp_path)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stdout and 'File "' not in result.stdout, result.stdout[-3000:]
    error = result.stdout[result.stdout.index("Bad input data") :]
    assert f"{bad}: sample rate 16000 Hz, expected 8000 Hz" in error
    assert len(error.splitlines()) <= 4  # the error line and the DataError's list of problems


def test_unworkable_recipe_arguments_stop_with_a_clear_error(corpus, tmp_path):
    # Three-speaker mixtures (a copy of the two-speaker ones with s2 again as s3), two speakers to mix.
    three_spk = Path(shutil.copytree(corpus["data_folder"] / "2speakers", tmp_path / "wsj0-mix" / "3speakers"))
    for split in ("tr", "cv", "tt"):
        shutil.copytree(three_spk / "wav8k" / "min" / split / "s2", three_spk / "wav8k" / "min" / split / "s3")
    two_speakers = tmp_path / "two_speakers"
    for spk in ("s00", "s01"):
        shutil.copytree(corpus["dm_folder"] / spk, two_speakers / spk)
    data = ["--data_folder", str(corpus["data_folder"])]
    both = [*data, "--dm_folder", str(corpus["dm_folder"])]
    cases = {  # name -> (extra arguments, phrase the error must contain, exception)
        "test without a checkpoint": ([*both, "--test_only"], "no checkpoint to test", "RecipeError"),
        "unknown dataset": ([*both, "--dataset", "wsj0-2mix"], "unknown dataset 'wsj0-2mix'", "RecipeError"),
        "WHAM! with 3 speakers": ([*both, "--dataset", "wham", "--num_spks", "3"], "num_spks=3", "RecipeError"),
        "dynamic mixing without dm_folder": (data, "needs dm_folder", "RecipeError"),
        # A positive threshold would drop nearly every item (the loss is the negative SI-SNR).
        "positive loss threshold": ([*both, "--loss_threshold", "30"], "loss_threshold must be a negative",
                                    "ValueError"),
        "dynamic mixing with too few speakers": (
            ["--data_folder", str(tmp_path / "wsj0-mix"), "--num_spks", "3", "--dm_folder", str(two_speakers)],
            "at least num_spks=3 speakers; found 2 (s00, s01)", "DataError"),
        # A trained experiment still tests, --test_only included.
        "train": ([*both, "--number_of_epochs", "1"], None, None),
        "test the trained model": ([*both, "--test_only"], None, None),
    }
    outputs = {name: tmp_path / ("trained" if name.startswith(("train", "test the")) else f"case{i}")
               for i, name in enumerate(cases)}
    argvs = {name: [str(TINY_HPARAMS), "--output_folder", str(outputs[name]), "--noprogressbar", *extra]
             for name, (extra, _, _) in cases.items()}
    result = run_recipe([sys.executable, "-c", MAIN_PER_CASE, json.dumps(argvs)], tmp_path)
    assert result.returncode == 0 and "OUTCOMES " in result.stdout, result.stdout[-3000:]
    outcomes = json.loads(result.stdout.split("OUTCOMES ", 1)[1])
    for name, (_, phrase, cause) in cases.items():
        outcome = outcomes[name]
        if phrase is None:
            assert outcome["code"] == 0, (name, outcome)
            continue
        assert outcome["code"] == 2 and outcome["cause"] == cause and phrase in outcome["message"], (name, outcome)
        assert not (outputs[name] / "test_results.csv").exists(), name
        log = outputs[name] / "log.txt"  # (a bad hparams value stops before the experiment folder is made)
        assert not log.exists() or "Going into epoch" not in log.read_text(), name
    assert str(outputs["test without a checkpoint"] / "save") in outcomes["test without a checkpoint"]["message"]
    assert outcomes["dynamic mixing with too few speakers"]["message"].startswith(f"{two_speakers}: ")
    assert not list((outputs["dynamic mixing without dm_folder"] / "save").glob("*.csv"))  # checked before data prep
    assert f"Cannot run the recipe: {outcomes['unknown dataset']['message']}\n" in result.stdout
    assert len(read_test_results(outputs["train"] / "test_results.csv")) == 3


def test_without_data_folder_the_demo_corpus_goes_to_demo_folder(tmp_path):
    # An hparams file without a demo_folder key still takes --demo_folder (a recipe option).
    hparams = tmp_path / "tiny_no_demo_key.yaml"
    hparams.write_text(re.sub(r"(?m)^demo_folder:.*\n", "", TINY_HPARAMS.read_text()))
    assert "demo_folder" not in hparams.read_text()
    command = recipe_command(tmp_path / "out", None, "--demo_folder", str(tmp_path / "demo"), "--debug")
    command[2] = str(hparams)
    result = run_recipe(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    demo_root = tmp_path / "demo" / "wsj0mix_2spk"
    test_csv = (tmp_path / "out" / "save" / "wsj_tt.csv").read_text().splitlines()
    assert len(test_csv) > 2 and all(f",{demo_root / 'wsj0-mix'}/" in row for row in test_csv[1:])
    assert (demo_root / "wsj0" / "si_tr_s").is_dir()
    assert not (tmp_path / "results").exists()  # nothing under the working directory
    assert len(read_test_results(tmp_path / "out" / "test_results.csv")) == 3  # --debug: 2 batches, and avg


def test_schedule_length_mismatch_is_reported(caplog):
    """lr_total_steps set for one process without accumulation is off with accumulation: a warning gives the
    run's number of optimizer steps; none when they match."""
    from types import SimpleNamespace

    from speechbrain_mamba.separation import recipe

    brain = SimpleNamespace(debug=False, grad_accumulation_factor=4)
    hparams = {"lr_total_steps": 200 * 1000 / 1, "lr_step_scheduler": object(), "epoch_counter": EpochCounter(200),
               "batch_size": 1}
    with caplog.at_level("WARNING", logger=recipe.logger.name):
        recipe._check_schedule_length(hparams, brain, range(1000))
    assert "pass --lr_total_steps 50000 to match it" in caplog.text
    caplog.clear()
    brain.grad_accumulation_factor = 1
    with caplog.at_level("WARNING", logger=recipe.logger.name):
        recipe._check_schedule_length(hparams, brain, range(1000))
    assert caplog.text == ""
