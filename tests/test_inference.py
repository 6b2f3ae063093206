"""Inference: export, the pretrained interface, the commands, long recordings, released checkpoints, bad input.

Models are tiny (tests/hparams/tiny_separation.yaml's DPMamba, a 4-channel SepMamba, a 16-channel
Mamba-TasNet); training runs are made by saving checkpoints with the run's own Checkpointer, as training does.
"""

import copy
import importlib
import os
import re
import runpy
import shutil
import stat
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf
import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references

from speechbrain_mamba.inference import (
    AudioError,
    CheckpointMismatchError,
    CUDAGraphCache,
    MambaSeparator,
    export_model,
    load_module_checkpoints,
    read_mixture,
    separate_in_chunks,
    write_sources,
)
from speechbrain_mamba.inference.cli import export_main, output_paths, separate_main
from speechbrain_mamba.separation.separator import separate_mixture

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DPMAMBA = REPO_ROOT / "tests" / "hparams" / "tiny_separation.yaml"
RATE = 8000
# A direct waveform model whose recoverable is named differently from its module.
TINY_SEPMAMBA = """
seed: 1234
output_folder: null
save_folder: !ref <output_folder>/save
num_spks: 2
sample_rate: 8000
model: !new:speechbrain_mamba.lobes.SepMamba
    dim: 4
    num_layers: 1
modules:
    model: !ref <model>
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: !ref <save_folder>
    recoverables:
        sepmamba: !ref <model>
"""
TINY_MAMBA_TASNET = """
num_spks: 2
Encoder: !new:speechbrain.lobes.models.dual_path.Encoder {kernel_size: 16, out_channels: 16}
MaskNet: !new:speechbrain_mamba.lobes.MambaTasNetMaskNet {channels: 16, num_layers: 2}
Decoder: !new:speechbrain.lobes.models.dual_path.Decoder
    {in_channels: 16, out_channels: 1, kernel_size: 16, stride: 8, bias: False}
modules: {encoder: !ref <Encoder>, masknet: !ref <MaskNet>, decoder: !ref <Decoder>}
"""


def make_training_run(root: Path, hparams_text: str) -> Dict[str, Dict[str, Dict[str, torch.Tensor]]]:
    """``root/hyperparams.yaml`` (as create_experiment_directory writes it) and two checkpoints saved by the run's
    Checkpointer: ``best`` (validation loss -5) and, with other weights, ``latest`` (-3). Returns their weights."""
    resolved = resolve_references(hparams_text, {"output_folder": str(root)}).getvalue()
    root.mkdir(parents=True)
    (root / "hyperparams.yaml").write_text(resolved)
    hparams = load_hyperpyyaml(resolved)
    weights = {}
    for name, loss in [("best", -5.0), ("latest", -3.0)]:
        with torch.no_grad():
            for module in hparams["modules"].values():
                for parameter in module.parameters():
                    parameter.add_(0.01 * torch.randn_like(parameter))
        hparams["checkpointer"].save_checkpoint(meta={"si-snr": loss}, name=name)
        weights[name] = {key: copy.deepcopy(module.state_dict()) for key, module in hparams["modules"].items()}
    return weights


def assert_same_weights(modules, expected: Dict[str, Dict[str, torch.Tensor]]) -> None:
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value.cpu(), expected[name][key]), f"{name}.{key}"


def speech_like(rng: np.random.Generator, seconds: float, f0: float) -> np.ndarray:
    """A harmonic tone with a syllable-like envelope, peak about 0.3."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 5))
    return (0.3 * wave * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t))).astype(np.float32) / 2


@pytest.fixture(scope="module")
def dpmamba_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "tiny_separation" / "1234"
    return root, make_training_run(root, TINY_DPMAMBA.read_text())


@pytest.fixture(scope="module")
def dpmamba_folder(dpmamba_run, tmp_path_factory):
    return export_model(dpmamba_run[0], tmp_path_factory.mktemp("exported") / "dpmamba")


# ----------------------------------------------------------------------------------------------------------------
# Long recordings: chunks, permutation alignment, cross-fade.
# ----------------------------------------------------------------------------------------------------------------


def activity_sources(length: int, num_spks: int, seed: int) -> torch.Tensor:
    """Noise-like sources switching on and off every 0.5-6 s, someone always speaking, often one alone."""
    rng = np.random.default_rng(seed)
    active = np.zeros((length, num_spks), dtype=bool)
    for spk in range(num_spks):
        position, state = 0, bool(rng.integers(2))
        while position < length:
            span = int(rng.uniform(0.5, 6.0) * RATE)
            active[position : position + span, spk] = state
            position, state = position + span, not state
    nobody = ~active.any(axis=1)
    active[nobody, rng.integers(num_spks)] = True
    sources = rng.standard_normal((length, num_spks)).astype(np.float32) * active * rng.uniform(0.2, 1.0, num_spks)
    return torch.from_numpy(sources.astype(np.float32))


class OracleSeparator:
    """Returns the true sources of each chunk in a random order (optionally with gain and leakage), and checks
    that chunks come in the documented schedule and never exceed the chunk length (bounded model memory)."""

    def __init__(self, mixture, sources, chunk_length, overlap, seed, leakage=0.0, gains=False):
        self.mixture, self.sources = mixture, sources
        self.chunk_length, self.hop = chunk_length, chunk_length - overlap
        self.rng = np.random.default_rng(seed)
        self.leakage, self.gains = leakage, gains
        self.starts: List[int] = []

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        start = len(self.starts) * self.hop
        assert len(chunk) <= self.chunk_length
        assert torch.equal(chunk, self.mixture[start : start + len(chunk)])
        self.starts.append(start)
        true = self.sources[start : start + len(chunk)]
        estimate = true + self.leakage * (true.sum(dim=1, keepdim=True) - true)
        if self.gains:
            estimate = estimate * torch.from_numpy(self.rng.uniform(0.7, 1.4, true.shape[1]).astype(np.float32))
        return estimate[:, torch.from_numpy(self.rng.permutation(true.shape[1]))]


def test_ten_minutes_in_chunks_keep_one_speaker_order():
    """10 min at 8 kHz, 30 s chunks, 4 s overlaps, random order per chunk: the exact sources come back."""
    length, chunk, overlap = 10 * 60 * RATE, 30 * RATE, 4 * RATE
    sources = activity_sources(length, 2, seed=1)
    mixture = sources.sum(dim=1)
    oracle = OracleSeparator(mixture, sources, chunk, overlap, seed=2)
    out = separate_in_chunks(oracle, mixture, chunk, overlap)
    assert len(oracle.starts) == 23 and oracle.starts[-1] + chunk >= length
    order = (out[:chunk].T @ sources[:chunk]).argmax(dim=1)  # the first chunk's order
    torch.testing.assert_close(out, sources[:, order], rtol=0, atol=1e-6)


def test_chunks_with_leakage_and_gains_three_speakers():
    """Estimates that leak the other speakers (20 %) and change gain per chunk (0.7-1.4): in every second,
    each output follows the same speaker as in the first chunk."""
    length, chunk, overlap = 90 * RATE, 8 * RATE, 2 * RATE
    sources = activity_sources(length, 3, seed=3)
    mixture = sources.sum(dim=1)
    oracle = OracleSeparator(mixture, sources, chunk, overlap, seed=4, leakage=0.2, gains=True)
    out = separate_in_chunks(oracle, mixture, chunk, overlap)
    first_truth = sources[: chunk - overlap]
    order = ((out[: chunk - overlap].T @ first_truth) / first_truth.pow(2).sum(dim=0)).argmax(dim=1)
    assert sorted(order.tolist()) == [0, 1, 2]
    checked = 0
    for start in range(0, length, RATE):
        segment, truth = out[start : start + RATE], sources[start : start + RATE]
        active = truth.abs().sum(dim=0) > 0
        # Regression coefficient of output i on speaker k: the chunk's gain for its own speaker, 20 % of it for others.
        coefficients = (segment.T @ truth) / truth.pow(2).sum(dim=0).clamp_min(1e-9)
        for i in range(3):
            if active[order[i]]:
                own = coefficients[i, order[i]]
                others = coefficients[i, active & (torch.arange(3) != order[i])]
                assert own > 0.5 and bool((others < 0.5 * own).all()), (start / RATE, i, coefficients)
                checked += 1
    assert checked > 100


def test_cross_fade_over_the_overlaps():
    """Chunk k returns the constant k + 1: plateaus between overlaps, sin^2 ramps (summing to one) across them."""
    chunk, overlap, calls = 100, 40, []

    def separate(piece: torch.Tensor) -> torch.Tensor:
        calls.append(len(piece))
        return torch.full((len(piece), 2), float(len(calls)))

    out = separate_in_chunks(separate, torch.zeros(250), chunk, overlap)[:, 0].double()  # chunks at 0, 60, 120, 180
    ramp = torch.sin(0.5 * torch.pi * (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap) ** 2
    expected = torch.cat([torch.full((60,), 1.0), 1 + ramp, torch.full((20,), 2.0), 2 + ramp, torch.full((20,), 3.0),
                          3 + ramp, torch.full((30,), 4.0)]).double()
    assert len(calls) == 4
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_short_input_is_one_call_and_bad_overlap_is_refused():
    calls = []

    def separate(chunk: torch.Tensor) -> torch.Tensor:
        calls.append(len(chunk))
        return torch.stack([chunk, -chunk], dim=1)

    separate_in_chunks(separate, torch.randn(500), chunk_length=500, overlap=100)
    separate_in_chunks(separate, torch.randn(900), chunk_length=0, overlap=0)
    assert calls == [500, 900]
    with pytest.raises(ValueError, match="overlap must be in"):
        separate_in_chunks(separate, torch.randn(900), chunk_length=500, overlap=300)


# ----------------------------------------------------------------------------------------------------------------
# Export of a training run and the pretrained interface.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hparams_text", [TINY_DPMAMBA.read_text(), TINY_SEPMAMBA], ids=["dpmamba", "sepmamba"])
def test_export_best_and_latest_load_with_from_hparams(hparams_text, tmp_path):
    run = tmp_path / "results" / "tiny" / "1234"
    weights = make_training_run(run, hparams_text)
    for which in ["best", "latest"]:
        folder = export_model(run, tmp_path / which, checkpoint=which)
        separator = MambaSeparator.from_hparams(source=str(folder), savedir=tmp_path / "fetched" / which)
        assert_same_weights(separator.mods, weights[which])
        assert separator.hparams.num_spks == 2 and separator.hparams.sample_rate == RATE
    module_names = sorted(weights["best"])
    expected_files = ["hyperparams.yaml"] + [f"{m}.ckpt" for m in module_names]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected_files)
    mixture = torch.randn(2, 3000)
    expected = separate_mixture(separator.mods, mixture, 2)  # the training forward, same modules
    torch.testing.assert_close(separator.separate_batch(mixture), expected)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(run, tmp_path / "best")
    export_model(run, tmp_path / "best", checkpoint="latest", overwrite=True)
    assert_same_weights(MambaSeparator.from_hparams(source=str(tmp_path / "best")).mods, weights["latest"])


def test_export_mismatch_names_file_and_keys_and_writes_nothing(dpmamba_run, tmp_path):
    run, _ = dpmamba_run
    wider = TINY_DPMAMBA.read_text().replace("N_encoder_out: 16", "N_encoder_out: 24")
    (tmp_path / "wider.yaml").write_text(wider)
    with pytest.raises(CheckpointMismatchError) as error:
        export_model(run, tmp_path / "out", hparams_file=tmp_path / "wider.yaml")
    message = str(error.value)
    assert "CKPT+best/encoder.ckpt does not match Encoder" in message
    assert "shapes differ: conv1d.weight (file (16, 1, 16), model (24, 1, 16))" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wider.yaml"]  # no output, no partial folder
    assert export_main([str(run), str(tmp_path / "out"), "--hparams", str(tmp_path / "wider.yaml")]) == 2
    empty = tmp_path / "empty_run"
    (empty / "save").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty_run/save: no checkpoint \(CKPT"):
        export_model(empty, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# Mamba-TasNet's released checkpoints (ckpts/WSJ0Mix/<model>/1234/save/CKPT+.../{encoder,masknet,decoder}.ckpt).
# ----------------------------------------------------------------------------------------------------------------


def released_run(root: Path, state_dicts: Dict[str, Dict[str, torch.Tensor]]) -> Path:
    """A release's layout: <root>/1234/save/CKPT+<date>/ with their CKPT.yaml (meta key '-si-snr')."""
    checkpoint = root / "1234" / "save" / "CKPT+2024-06-21+13-39-29+00"
    checkpoint.mkdir(parents=True)
    (checkpoint / "CKPT.yaml").write_text("-si-snr: -19.53\nend-of-epoch: true\nunixtime: 1718991569.5\n")
    for name, state_dict in state_dicts.items():
        torch.save(state_dict, checkpoint / f"{name}.ckpt")
    return root / "1234"


def test_released_dpmamba_checkpoint_loads_strictly(tmp_path):
    original = load_hyperpyyaml(TINY_DPMAMBA.read_text(), {"output_folder": str(tmp_path)})["modules"]
    masknet_keys = original["masknet"].state_dict().keys()
    for key in ["dual_mdl.0.intra_mdl.layers.0.mixer.conv1d_b.weight", "dual_mdl.0.intra_mdl.norm_f.weight",
                "dual_mdl.0.inter_mdl.layers.0.mixer.A_b_log", "dual_mdl.0.inter_mdl.layers.0.norm.weight"]:
        assert key in masknet_keys  # the released DPMamba layout
    folder = released_run(tmp_path / "dpmamba_XS", {n: m.state_dict() for n, m in original.items()})
    checkpoint = next((folder / "save").iterdir())
    fresh = load_hyperpyyaml(TINY_DPMAMBA.read_text(), {"output_folder": str(tmp_path), "seed": 7})["modules"]
    load_module_checkpoints(fresh, checkpoint)
    assert_same_weights(fresh, {n: m.state_dict() for n, m in original.items()})

    broken = dict(original["masknet"].state_dict())
    broken["dual_mdl.0.intra_mdl.layers.0.mixer.conv1d_back.weight"] = broken.pop(
        "dual_mdl.0.intra_mdl.layers.0.mixer.conv1d_b.weight"
    )
    torch.save(broken, checkpoint / "masknet.ckpt")
    with pytest.raises(CheckpointMismatchError) as error:
        load_module_checkpoints(fresh, checkpoint)
    assert str(error.value) == (
        f"{checkpoint / 'masknet.ckpt'} does not match DualPathModel: keys of the model missing from the file: "
        "dual_mdl.0.intra_mdl.layers.0.mixer.conv1d_b.weight; keys in the file but not in the model: "
        "dual_mdl.0.intra_mdl.layers.0.mixer.conv1d_back.weight"
    )
    torch.save(original["masknet"].state_dict(), checkpoint / "masknet.ckpt")
    (checkpoint / "decoder.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="decoder.ckpt: no such checkpoint file"):
        load_module_checkpoints(fresh, checkpoint)


def test_released_mamba_tasnet_checkpoint_exports_and_separates(tmp_path):
    """The release's mask network (channel-wise layer norm, 1x1 convolutions, mamba_net) in our model."""
    model_file = tmp_path / "mamba_tasnet_tiny.yaml"
    model_file.write_text(TINY_MAMBA_TASNET)
    original = load_hyperpyyaml(TINY_MAMBA_TASNET)["modules"]
    ours = original["masknet"].state_dict()
    released_masknet = {
        "layer_norm.gamma": ours["norm.weight"].reshape(1, 1, -1),
        "layer_norm.beta": ours["norm.bias"].reshape(1, 1, -1),
        "bottleneck_conv1x1.conv.weight": ours["bottleneck.weight"][:, :, None],
        "mask_conv1x1.conv.weight": ours["mask_proj.weight"][:, :, None],
        **{"mamba_net." + k[len("mamba.") :]: v for k, v in ours.items() if k.startswith("mamba.")},
    }
    assert {"mamba_net.layers.1.mixer.x_proj_b.weight", "mamba_net.norm_f.weight"} <= released_masknet.keys()
    state_dicts = {"encoder": original["encoder"].state_dict(), "masknet": released_masknet,
                   "decoder": original["decoder"].state_dict()}
    run = released_run(tmp_path / "mambatasnet_XS", state_dicts)
    assert export_main([str(run), str(tmp_path / "out"), "--hparams", str(model_file)]) == 2  # no 'si-snr' meta
    folder = export_model(run, tmp_path / "out", hparams_file=model_file, checkpoint="latest")
    separator = MambaSeparator.from_hparams(source=str(folder))
    assert_same_weights(separator.mods, {n: m.state_dict() for n, m in original.items()})
    mixture = torch.randn(1, 2400)
    with torch.no_grad():
        torch.testing.assert_close(separator.separate_batch(mixture), separate_mixture(original, mixture, 2))


# ----------------------------------------------------------------------------------------------------------------
# The commands.
# ----------------------------------------------------------------------------------------------------------------


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or "partial" in p.name]


def test_separate_command_real_model(dpmamba_folder, tmp_path, capfd):
    """A 2 s stereo 16 kHz recording through the tiny DPMamba in 0.8 s chunks: outputs at 16 kHz, input length."""
    rng = np.random.default_rng(0)
    mix = speech_like(rng, 4.0, 140.0)[::2] + speech_like(rng, 4.0, 230.0)[::2]  # 2 s at 16 kHz
    sf.write(tmp_path / "meeting.flac", np.stack([mix, 0.5 * mix], axis=1), 16000)
    out = tmp_path / "separated"
    args = [str(tmp_path / "meeting.flac"), "-m", str(dpmamba_folder), "-o", str(out), "--device", "cpu",
            "--chunk-seconds", "0.8", "--overlap-seconds", "0.2"]
    assert separate_main(args) == 0
    assert "meeting.flac: 2 channels, downmixed to mono" in capfd.readouterr().err
    outputs = [out / "meeting_spk1.wav", out / "meeting_spk2.wav"]
    for path in outputs:
        data, rate = sf.read(path)
        assert rate == 16000 and data.shape == (len(mix),) and np.isfinite(data).all() and np.abs(data).max() > 0
        assert sf.info(path).subtype == "FLOAT"
    assert no_partial_files(out)
    before = [p.stat().st_mtime_ns for p in outputs]
    assert separate_main(args) == 0
    assert "skipped, its outputs exist" in capfd.readouterr().err
    assert [p.stat().st_mtime_ns for p in outputs] == before
    assert separate_main(args + ["--overwrite", "--precision", "bf16"]) == 0
    assert [p.stat().st_mtime_ns for p in outputs] != before
    assert separate_main(args + ["--overwrite", "--cuda-graphs"]) == 0  # on the CPU: the eager forward


def test_separate_command_on_the_cpu_keeps_freed_memory(dpmamba_folder, tmp_path, monkeypatch):
    """On the CPU the command sets glibc to reuse freed memory (speechbrain_mamba.utils.cpu), once."""
    calls = []
    monkeypatch.setattr("speechbrain_mamba.inference.cli.keep_freed_memory", lambda: calls.append(True))
    sf.write(tmp_path / "mix.wav", 0.1 * np.random.default_rng(0).standard_normal(800), 8000)
    args = [str(tmp_path / "mix.wav"), "-m", str(dpmamba_folder), "-o", str(tmp_path / "out"), "--device", "cpu"]
    assert separate_main(args) == 0
    assert calls == [True]


def test_cuda_graph_cache_off_cuda_calls_the_function_and_checks_its_arguments():
    calls = []
    graphed = CUDAGraphCache(lambda x: calls.append(x) or 2 * x)
    torch.testing.assert_close(graphed(torch.ones(3)), torch.full((3,), 2.0))
    assert len(calls) == 1 and len(graphed) == 0  # nothing captured on the CPU (the GPU test replays)
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphCache(lambda x: x, max_graphs=0)


def test_separate_folder_reports_bad_files_and_writes_only_good_ones(dpmamba_folder, tmp_path, capfd):
    inputs = tmp_path / "inputs"
    (inputs / "day2").mkdir(parents=True)
    rng = np.random.default_rng(1)
    sf.write(inputs / "a.wav", speech_like(rng, 0.5, 150.0), RATE)
    sf.write(inputs / "day2" / "b.wav", speech_like(rng, 0.5, 190.0), 22050)
    sf.write(inputs / "day2" / "silent.wav", np.zeros(RATE), RATE)
    sf.write(inputs / "nan.wav", np.where(np.arange(RATE) == 7, np.nan, 0.1), RATE, subtype="FLOAT")
    (inputs / "broken.wav").write_text("not audio, but named as such")
    (inputs / "notes.txt").write_text("not audio, not searched for")
    out = tmp_path / "out"
    assert separate_main([str(inputs), "-m", str(dpmamba_folder), "-o", str(out), "--device", "cpu"]) == 1
    err = capfd.readouterr().err
    assert f"{inputs / 'broken.wav'}: not audio that libsndfile reads" in err
    assert f"{inputs / 'day2' / 'silent.wav'}: silent" in err
    assert f"{inputs / 'nan.wav'}: 1 of 8000 samples are NaN" in err
    assert "Separated 2 of 5 inputs (0 skipped, 3 failed)" in err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert written == ["a_spk1.wav", "a_spk2.wav", "day2", "day2/b_spk1.wav", "day2/b_spk2.wav"]
    assert sf.info(out / "day2" / "b_spk1.wav").samplerate == 22050


def test_separate_command_usage_errors(dpmamba_run, dpmamba_folder, tmp_path, capfd):
    model = ["-m", str(dpmamba_folder), "-o", str(tmp_path / "out")]
    assert separate_main([str(tmp_path / "missing.wav")] + model) == 2
    assert f"{tmp_path / 'missing.wav'}: no such file or folder" in capfd.readouterr().err
    assert separate_main([str(tmp_path), "-m", str(tmp_path / "no_model")]) == 2
    assert "no_model: no such folder" in capfd.readouterr().err
    assert separate_main([str(tmp_path), "-m", str(dpmamba_run[0])]) == 2
    assert "is a training run; export it first" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_and_console_scripts(dpmamba_folder, tmp_path, monkeypatch):
    """``python -m speechbrain_mamba.inference [export] ...`` runs the commands; setup.py's entry points resolve."""
    sf.write(tmp_path / "mix.wav", speech_like(np.random.default_rng(2), 0.4, 170.0), RATE)
    separate = [str(tmp_path / "mix.wav"), "-m", str(dpmamba_folder), "-o", str(tmp_path / "out"), "--device", "cpu"]
    for argv in [["export", str(tmp_path / "missing_run"), str(tmp_path / "exported")], separate]:
        monkeypatch.setattr(sys, "argv", ["python -m speechbrain_mamba.inference"] + argv)
        with pytest.raises(SystemExit) as status:
            runpy.run_module("speechbrain_mamba.inference", run_name="__main__")
        assert status.value.code == (2 if argv[0] == "export" else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.wav", "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mix_spk1.wav", "mix_spk2.wav"]
    scripts = re.findall(r'"(speechbrain-mamba-\w+)=([\w.]+):(\w+)"', (REPO_ROOT / "setup.py").read_text())
    assert {name for name, _, _ in scripts} == {"speechbrain-mamba-separate", "speechbrain-mamba-export"}
    for _, module, function in scripts:
        assert callable(getattr(importlib.import_module(module), function))


# ----------------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, write, expected",
    [
        ("missing.wav", None, "missing.wav: no such file"),
        ("text.wav", lambda p: p.write_text("RIFF? no."), "text.wav: not audio that libsndfile reads"),
        ("silence.wav", lambda p: sf.write(p, np.zeros(4000), RATE), "silence.wav: silent (peak amplitude 0"),
        ("short.wav", lambda p: sf.write(p, np.full(400, 0.1), RATE),
         "short.wav: 0.050 s of audio (400 samples at 8000 Hz); at least 0.1 s was expected"),
        ("nan.wav", lambda p: sf.write(p, np.array([0.1, np.nan, np.inf] * 1000), RATE, subtype="FLOAT"),
         "nan.wav: 2000 of 3000 samples are NaN or infinite; finite samples were expected"),
    ],
)
def test_bad_input_is_refused_with_the_file_and_what_was_expected(name, write, expected, tmp_path):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises((AudioError, FileNotFoundError)) as error:
        read_mixture(path)
    assert str(error.value).startswith(f"{tmp_path / name}: ") and expected in str(error.value)


def test_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "blocked").write_text("a file where a folder is needed")
    paths = [tmp_path / "ok_spk1.wav", tmp_path / "blocked" / "x_spk2.wav"]
    with pytest.raises(OSError):
        write_sources(torch.zeros(800, 2), RATE, paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]


# ----------------------------------------------------------------------------------------------------------------
# Permissions, reruns into an output folder inside the input, RAW, tensor layouts, broken checkpoints, usage errors.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_outputs_and_exported_folder_have_the_modes_of_new_files(dpmamba_run, tmp_path, umask_027):
    """Staged through mkstemp/mkdtemp (0600/0700), they still get 0666/0777 less the umask once in place."""
    write_sources(torch.zeros(800, 2), RATE, [tmp_path / "a_spk1.wav", tmp_path / "a_spk2.wav"])
    for name in ["a_spk1.wav", "a_spk2.wav"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    folder = export_model(dpmamba_run[0], tmp_path / "exported")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o640}


def test_rerun_with_output_folder_inside_the_input_folder(dpmamba_folder, tmp_path, monkeypatch, capfd):
    """The defaults (input ., -o ./separated): a second run skips the first run's outputs instead of nesting."""
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "mix.wav", speech_like(np.random.default_rng(3), 0.4, 170.0), RATE)
    args = [".", "-m", str(dpmamba_folder), "--device", "cpu"]
    assert separate_main(args) == 0
    assert separate_main(args) == 0
    assert "skipped, its outputs exist" in capfd.readouterr().err
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["mix.wav", "separated", "separated/mix_spk1.wav", "separated/mix_spk2.wav"]
    planned = output_paths([tmp_path], tmp_path / "separated", 2)
    assert list(planned) == [tmp_path / "mix.wav"]


def test_an_output_that_is_also_an_input_is_refused(dpmamba_folder, tmp_path, capfd):
    for name in ["mix.wav", "mix_spk1.wav"]:
        sf.write(tmp_path / name, speech_like(np.random.default_rng(4), 0.4, 170.0), RATE)
    with pytest.raises(ValueError, match="mix_spk1.wav is both an input and the output of"):
        output_paths([tmp_path], tmp_path, 2)
    assert separate_main([str(tmp_path), "-m", str(dpmamba_folder), "-o", str(tmp_path), "--device", "cpu"]) == 2
    assert "is both an input and the output of" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.wav", "mix_spk1.wav"]


def test_raw_files_are_not_searched_for_and_read_errors_name_the_file(dpmamba_folder, tmp_path, capfd):
    sf.write(tmp_path / "mix.wav", speech_like(np.random.default_rng(5), 0.4, 170.0), RATE)
    sf.write(tmp_path / "headerless.raw", np.full(RATE, 0.1), RATE, format="RAW", subtype="PCM_16")
    assert list(output_paths([tmp_path], tmp_path / "out", 2)) == [tmp_path / "mix.wav"]
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'headerless.raw'}: not audio that libsndfile reads")):
        read_mixture(tmp_path / "headerless.raw")
    # Given explicitly, a RAW file fails alone: the next input is still separated.
    args = [str(tmp_path / "headerless.raw"), str(tmp_path / "mix.wav"), "-m", str(dpmamba_folder),
            "-o", str(tmp_path / "out"), "--device", "cpu"]
    assert separate_main(args) == 1
    assert "Separated 1 of 2 inputs (0 skipped, 1 failed)" in capfd.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mix_spk1.wav", "mix_spk2.wav"]


def test_separate_signal_takes_one_channel_in_any_layout_and_chunks_it(monkeypatch):
    """[1, T] (torchaudio.load) and [T, 1] are chunked like [T] and give the same output; several channels are
    refused with the expected shape."""
    from speechbrain_mamba.lobes import SepMamba

    torch.manual_seed(0)
    separator = MambaSeparator(modules={"model": SepMamba(dim=4, num_layers=1)},
                               hparams={"num_spks": 2, "sample_rate": RATE}, run_opts={"device": "cpu"})
    mixture = 0.3 * torch.randn(2 * RATE)
    lengths: List[int] = []
    separate_batch = separator.separate_batch
    monkeypatch.setattr(separator, "separate_batch", lambda mix: lengths.append(mix.shape[-1]) or separate_batch(mix))
    expected = separator.separate_signal(mixture, RATE, chunk_seconds=0.5, overlap_seconds=0.1)
    assert expected.shape == (2 * RATE, 2) and max(lengths) == RATE // 2
    for layout in [mixture[None], mixture[:, None]]:
        lengths.clear()
        torch.testing.assert_close(separator.separate_signal(layout, RATE, 0.5, 0.1), expected, rtol=0, atol=0)
        assert max(lengths) == RATE // 2
    for shape in [(2, 2 * RATE), (2 * RATE, 2), (1, 1, 2 * RATE)]:
        with pytest.raises(AudioError, match=r"one channel of shape \[time\] was expected"):
            separator.separate_signal(torch.randn(shape), RATE)


@pytest.mark.parametrize("content", [b"", b"garbage, not a pickle", None], ids=["empty", "garbage", "truncated"])
def test_unreadable_checkpoint_names_the_file(content, dpmamba_folder, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(dpmamba_folder, folder)
    checkpoint = folder / "masknet.ckpt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"{checkpoint}: not a readable PyTorch state dict")):
        load_module_checkpoints({"masknet": torch.nn.Linear(1, 1)}, folder)
    sf.write(tmp_path / "mix.wav", speech_like(np.random.default_rng(6), 0.4, 170.0), RATE)
    args = [str(tmp_path / "mix.wav"), "-m", str(folder), "-o", str(tmp_path / "out"), "--device", "cpu",
            "--savedir", str(tmp_path / "fetched")]
    assert separate_main(args) == 2
    assert "masknet.ckpt: not a readable PyTorch state dict" in capfd.readouterr().err
    torch.save([1, 2], checkpoint)  # readable, but not a state dict
    with pytest.raises(CheckpointMismatchError, match="holds a list, not a mapping"):
        load_module_checkpoints({"masknet": torch.nn.Linear(1, 1)}, folder)


def test_separate_command_more_usage_errors(dpmamba_folder, tmp_path, capfd, monkeypatch):
    """One line on stderr and exit 2, before any model is loaded or anything written."""
    sf.write(tmp_path / "mix.wav", speech_like(np.random.default_rng(7), 0.4, 170.0), RATE)
    (tmp_path / "notadir").write_text("a file")
    base = [str(tmp_path / "mix.wav"), "-m", str(dpmamba_folder)]
    loads = []
    monkeypatch.setattr(MambaSeparator, "from_hparams", lambda *a, **k: loads.append(True))
    assert separate_main(base + ["-o", str(tmp_path / "notadir")]) == 2
    assert f"{tmp_path / 'notadir'} is a file; an output folder was expected" in capfd.readouterr().err
    assert separate_main(base + ["-o", str(tmp_path / "out"), "--device", "gpu"]) == 2
    assert "--device gpu: not a device" in capfd.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert separate_main(base + ["-o", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capfd.readouterr().err
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mix.wav", "notadir"]
    monkeypatch.undo()

    broken = tmp_path / "broken_model"
    shutil.copytree(dpmamba_folder, broken)
    (broken / "hyperparams.yaml").write_text("num_spks: 2\nmodules: {model: [unclosed\n")
    assert separate_main(base[:1] + ["-m", str(broken), "-o", str(tmp_path / "out"), "--device", "cpu",
                                     "--savedir", str(tmp_path / "fetched")]) == 2
    err = capfd.readouterr().err
    assert f"{broken}: its hyperparams.yaml is not valid YAML" in err and "Traceback" not in err


def test_a_failed_write_counts_as_a_failed_input(dpmamba_folder, tmp_path, capfd):
    for name in ["a.wav", "b.wav"]:
        sf.write(tmp_path / name, speech_like(np.random.default_rng(8), 0.4, 170.0), RATE)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_spk1.wav").mkdir()  # a folder where a's first output goes: os.replace fails
    args = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "-m", str(dpmamba_folder), "-o", str(out),
            "--device", "cpu", "--overwrite"]
    assert separate_main(args) == 1
    err = capfd.readouterr().err
    assert f"{tmp_path / 'a.wav'}: " in err and "Separated 1 of 2 inputs (0 skipped, 1 failed)" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_spk1.wav", "b_spk1.wav", "b_spk2.wav"]
    assert no_partial_files(out)
