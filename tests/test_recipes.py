"""The recipe hparams files: recipes/{WSJ0Mix,LibriMix,WHAM}/separation/hparams/*.yaml (3 x 10).

* Every file loads with HyperPyYAML, its modules have the expected parameter count, it defines the keys
  shared by all recipes, and its learning-rate schedulers are checkpointed.
* The ``reinit_scheme`` switch of the Mamba files (speechbrain_mamba.utils.init.reinitialize), as evaluated
  at load time: "mamba" gives every dual-path layer its own weights and Mamba's dt initialisation,
  "pytorch" (the published recipe) moves dt out of Mamba's range, "none" keeps identical deep copies.
* End to end: ``train.py --debug`` on the embedded demo corpus (1 epoch of 1 batch of 0.5 s, then
  validation and test on 1 mixture each) for the XS models of every recipe (LibriMix: DPMamba clean,
  Mamba-TasNet noisy) and the baselines (WSJ0Mix: DPRNN, LibriMix: Sepformer), asserting
  ``test_results.csv`` with its 5 columns and an ``avg`` row. The selected runs go two at a time (one thread
  each) from a module fixture, about 100 s in all on 2 idle cores.
* The S/M/L models are too slow for training runs on a CPU (one forward pass of a 0.25 s mixture through
  DPMamba-L alone takes 10-20 s on one core): they are covered by loading their files (above, in every
  recipe) and one forward pass of a 0.25 s mixture, each model in one of the recipes (the model definitions
  are shared by the recipes).

Everything is written under pytest's tmp_path; the subprocesses also run there.
"""

import csv
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from hyperpyyaml import load_hyperpyyaml

from speechbrain_mamba.lobes import Mamba, SepMamba
from speechbrain_mamba.separation.demo import build_demo_dataset
from speechbrain_mamba.separation.recipe import DEMO_OVERRIDES
from speechbrain_mamba.separation.separator import separate_mixture
from test_models import EXPECTED_PARAMS as MAMBA_PARAMS
from test_sepmamba import EXPECTED as SEPMAMBA_PARAMS

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"WSJ0Mix": "wsj0mix", "LibriMix": "librimix", "WHAM": "wham"}
MAMBA_MODELS = sorted(MAMBA_PARAMS)
BASELINES = ["dprnn", "sepformer"]
EXPECTED_PARAMS = {**MAMBA_PARAMS, "sepformer": 25_679_361, "dprnn": 14_617_089}
FILES = [(recipe, model) for recipe in RECIPES for model in MAMBA_MODELS + BASELINES]
# SepMamba (a direct waveform model, constant learning rate): its own checks below.
SEPMAMBA_MODELS = sorted(SEPMAMBA_PARAMS)
SEPMAMBA_FILES = [(recipe, model) for recipe in RECIPES for model in SEPMAMBA_MODELS]

# (recipe, model, extra overrides): the debug runs.
DEBUG_RUNS = [
    ("WSJ0Mix", "dpmamba_xs", ()),
    ("WSJ0Mix", "mamba_tasnet_xs", ()),
    ("WSJ0Mix", "dprnn", ()),
    ("LibriMix", "dpmamba_xs", ()),
    ("LibriMix", "mamba_tasnet_xs", ("--condition", "noisy")),
    ("LibriMix", "sepformer", ()),
    ("WHAM", "dpmamba_xs", ()),
    ("WHAM", "mamba_tasnet_xs", ()),
    ("WSJ0Mix", "sepmamba_s", ()),
    ("WSJ0Mix", "sepmamba_causal_s", ()),
]
DEBUG_ARGS = [
    "--debug", "--debug_batches", "1", "--debug_epochs", "1", "--training_signal_len", "4000", "--batch_size", "1",
]
RUN_TIMEOUT = 600  # seconds for one debug run (about 15-40 s on an idle 2-core CPU)

SHARED_KEYS = [
    "seed", "experiment", "output_folder", "save_folder", "train_log", "demo_folder",
    "dataset", "data_folder", "dm_folder", "num_spks", "sample_rate", "skip_prep",
    "number_of_epochs", "mixtures_per_epoch", "dynamic_mixing", "speed_perturb_speeds", "training_signal_len",
    "batch_size", "num_workers", "lr", "loss_threshold", "max_grad_norm", "precision", "save_audio",
    "model", "modules", "optimizer", "epoch_counter", "checkpointer", "train_logger",
]
MAMBA_KEYS = ["lr_warmup_steps", "lr_total_steps", "reinit_scheme", "lr_step_scheduler"]
BASELINE_KEYS = ["lr_dont_halve_until_epoch", "lr_epoch_scheduler"]
RESULT_COLUMNS = ["snt_id", "sdr", "sdr_i", "si-snr", "si-snr_i"]
DT_RANGE = (1e-3 * (1 - 1e-4), 0.1 * (1 + 1e-4))  # Mamba's dt_min, dt_max, with float rounding


def hparams_path(recipe: str, model: str) -> Path:
    return REPO_ROOT / "recipes" / recipe / "separation" / "hparams" / f"{model}.yaml"


def load_recipe(recipe: str, model: str, tmp_path: Path, **overrides) -> dict:
    """Loads a recipe file with a dummy data_folder and every output under tmp_path."""
    overrides = {"data_folder": "/no/such/data", "output_folder": str(tmp_path / "out"), **overrides}
    with open(hparams_path(recipe, model)) as handle:
        return load_hyperpyyaml(handle, overrides)


def count(hparams: dict) -> int:
    return sum(p.numel() for module in hparams["modules"].values() for p in module.parameters())


def dt_values(module: torch.nn.Module) -> torch.Tensor:
    """softplus(dt bias) of every direction of every Mamba mixer in module: the initial step sizes."""
    values = []
    for mixer in module.modules():
        if isinstance(mixer, Mamba):
            for name in ("dt_proj", "dt_proj_b"):
                if hasattr(mixer, name):
                    values.append(F.softplus(getattr(mixer, name).bias.detach().float()))
    return torch.cat(values)


def in_dt_range(dt: torch.Tensor) -> torch.Tensor:
    return (dt >= DT_RANGE[0]) & (dt <= DT_RANGE[1])


# ----------------------------------------------------------------------------------------------------------------
# Every file: loads, parameter count, shared keys, checkpointed schedulers.
# ----------------------------------------------------------------------------------------------------------------


def test_every_recipe_has_every_model():
    for recipe in RECIPES:
        found = sorted(path.stem for path in hparams_path(recipe, "x").parent.glob("*.yaml"))
        assert found == sorted(MAMBA_MODELS + BASELINES + SEPMAMBA_MODELS), recipe
        assert (REPO_ROOT / "recipes" / recipe / "separation" / "train.py").is_file()


@pytest.mark.parametrize("recipe, model", FILES)
def test_recipe_file_loads(recipe, model, tmp_path):
    hparams = load_recipe(recipe, model, tmp_path)
    assert count(hparams) == EXPECTED_PARAMS[model]
    keys = SHARED_KEYS + (MAMBA_KEYS if model in MAMBA_PARAMS else BASELINE_KEYS)
    assert [key for key in keys if key not in hparams] == []
    assert hparams["dataset"] == RECIPES[recipe]
    # The demo schedule applies to the keys every file shares.
    assert [key for key in DEMO_OVERRIDES if key not in hparams and key != "lr_warmup_steps"] == []
    # The modules are the model file's objects, and those are what is checkpointed.
    recoverables = hparams["checkpointer"].recoverables
    for key, name in (("encoder", "Encoder"), ("masknet", "MaskNet"), ("decoder", "Decoder")):
        assert hparams["modules"][key] is hparams["model"][name] is recoverables[key]
    assert recoverables["counter"] is hparams["epoch_counter"]
    scheduler_key = "lr_step_scheduler" if model in MAMBA_PARAMS else "lr_epoch_scheduler"
    assert hparams[scheduler_key] in recoverables.values()
    assert "lr_step_scheduler" not in hparams or "lr_epoch_scheduler" not in hparams
    # No two files of a recipe write to the same output folder.
    assert hparams["experiment"].startswith(model + "-")
    # The training setups (see each file's header).
    assert (hparams["lr"], hparams["batch_size"], hparams["number_of_epochs"], hparams["max_grad_norm"]) == (
        1.5e-4, 1, 200, 5
    )
    assert hparams["dynamic_mixing"] and hparams["speed_perturb_speeds"] == [95, 100, 105]
    assert hparams["training_signal_len"] is None
    if model in MAMBA_PARAMS:
        scheduler = hparams["lr_step_scheduler"]
        assert (hparams["loss_threshold"], hparams["precision"], hparams["reinit_scheme"]) == (-40, "bf16", "mamba")
        assert (scheduler.peak_lr, scheduler.warmup_steps, scheduler.final_ratio) == (1.5e-4, 20000, 0.01)
        assert scheduler.total_steps == 200 * 20000
    else:
        scheduler = hparams["lr_epoch_scheduler"]
        assert (hparams["loss_threshold"], hparams["precision"]) == (-30, "fp32")
        assert (scheduler.factor, scheduler.patience) == (0.5, 2)
        assert scheduler.dont_halve_until_epoch == {"WSJ0Mix": 85, "LibriMix": 5, "WHAM": 65}[recipe]


@pytest.mark.parametrize("recipe, model", SEPMAMBA_FILES)
def test_sepmamba_recipe_file_loads(recipe, model, tmp_path):
    """One ``model`` module (checkpointed), AdamW 1.5e-4 with weight decay 0.01 at a constant rate, 4 s segments."""
    hparams = load_recipe(recipe, model, tmp_path)
    assert count(hparams) == SEPMAMBA_PARAMS[model]
    assert [key for key in SHARED_KEYS + ["weight_decay"] if key not in hparams] == []
    assert hparams["dataset"] == RECIPES[recipe]
    assert [key for key in DEMO_OVERRIDES if key not in hparams and key != "lr_warmup_steps"] == []
    recoverables = hparams["checkpointer"].recoverables
    assert list(hparams["modules"]) == ["model"]
    assert hparams["modules"]["model"] is hparams["model"]["model"] is recoverables["model"]
    assert isinstance(hparams["modules"]["model"], SepMamba)
    assert hparams["modules"]["model"].causal == ("causal" in model)
    assert recoverables["counter"] is hparams["epoch_counter"]
    assert "lr_step_scheduler" not in hparams and "lr_epoch_scheduler" not in hparams  # constant learning rate
    assert hparams["experiment"].startswith(model + "-")
    optimizer = hparams["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (1.5e-4, 0.01)
    assert (hparams["lr"], hparams["batch_size"], hparams["number_of_epochs"], hparams["max_grad_norm"]) == (
        1.5e-4, 1, 200, 5
    )
    assert hparams["dynamic_mixing"] and hparams["training_signal_len"] == 4 * hparams["sample_rate"]
    assert hparams["loss_threshold"] is None
    if recipe == "WSJ0Mix" and model == "sepmamba_s":
        assert load_recipe(recipe, model, tmp_path, num_spks=3)["modules"]["model"].num_spks == 3


def test_experiment_names_separate_corpora_and_conditions(tmp_path):
    names = {
        load_recipe("LibriMix", "dpmamba_xs", tmp_path, **overrides)["experiment"]
        for overrides in ({}, {"condition": "noisy"}, {"num_spks": 3})
    }
    assert names == {"dpmamba_xs-libri2mix-clean", "dpmamba_xs-libri2mix-noisy", "dpmamba_xs-libri3mix-clean"}
    assert load_recipe("WSJ0Mix", "dpmamba_xs", tmp_path, num_spks=3)["experiment"] == "dpmamba_xs-wsj0-3mix"


def test_librimix_condition_reaches_data_preparation(tmp_path):
    """recipe.py passes data_prep_options as keyword arguments to prepare_data (then prepare_librimix)."""
    assert load_recipe("LibriMix", "sepformer", tmp_path)["data_prep_options"] == {"condition": "clean"}
    noisy = load_recipe("LibriMix", "sepformer", tmp_path, condition="noisy")
    assert noisy["data_prep_options"] == {"condition": "noisy"}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_reduce_lr_on_plateau_as_the_brain_calls_it(recipe, tmp_path):
    """brain.py: ``_, lr = lr_epoch_scheduler([optimizer], epoch, valid_loss)``, then update_learning_rate."""
    hparams = load_recipe(recipe, "dprnn", tmp_path, lr_dont_halve_until_epoch=1)
    scheduler = hparams["lr_epoch_scheduler"]
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=hparams["lr"])
    rates = []
    for epoch, valid_loss in enumerate([-10.0, -9.0, -9.0, -9.0, -9.0], start=1):  # no improvement after epoch 1
        current, new = scheduler([optimizer], epoch, valid_loss)
        assert current == optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            group["lr"] = new
        rates.append(new)
    assert rates == [1.5e-4, 1.5e-4, 1.5e-4, 7.5e-5, 7.5e-5]  # halved after patience (2) epochs


# ----------------------------------------------------------------------------------------------------------------
# reinit_scheme, evaluated at load time.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_reinit_mamba_draws_every_layer_with_mamba_dt(recipe, tmp_path):
    masknet = load_recipe(recipe, "dpmamba_xs", tmp_path)["modules"]["masknet"]  # default: mamba
    layers = [masknet.dual_mdl[i].intra_mdl.layers[0].mixer for i in range(len(masknet.dual_mdl))]
    for name in ("in_proj", "x_proj", "dt_proj", "conv1d_b", "out_proj"):
        weights = [getattr(layer, name).weight for layer in layers]
        assert not any(torch.equal(weights[0], other) for other in weights[1:]), name
    assert not torch.equal(layers[0].dt_proj.bias, layers[1].dt_proj.bias)
    assert not torch.equal(masknet.dual_mdl[0].intra_mdl.layers[0].mixer.in_proj.weight,
                           masknet.dual_mdl[0].inter_mdl.layers[0].mixer.in_proj.weight)
    assert bool(in_dt_range(dt_values(masknet)).all())


def test_reinit_mamba_keeps_mamba_tasnet_init(tmp_path):
    masknet = load_recipe("WSJ0Mix", "mamba_tasnet_xs", tmp_path)["modules"]["masknet"]
    assert bool(in_dt_range(dt_values(masknet)).all())
    layers = masknet.mamba.layers
    # out_proj rescaled by 1/sqrt(16): PyTorch's bound 1/sqrt(fan_in) becomes 1/sqrt(256) / 4.
    bound = 1 / math.sqrt(layers[0].mixer.d_inner) / math.sqrt(len(layers))
    assert all(float(layer.mixer.out_proj.weight.detach().abs().max()) <= bound * (1 + 1e-5) for layer in layers)
    assert float(layers[0].mixer.out_proj.weight.detach().abs().max()) > 0.9 * bound


@pytest.mark.parametrize("model", ["dpmamba_xs", "mamba_tasnet_xs"])
def test_reinit_pytorch_is_the_published_init(model, tmp_path):
    """The published recipe's reset: every layer its own draw, dt out of Mamba's range (about 0.5-0.9)."""
    masknet = load_recipe("WSJ0Mix", model, tmp_path, reinit_scheme="pytorch")["modules"]["masknet"]
    dt = dt_values(masknet)
    assert not bool(in_dt_range(dt).any())
    assert float(dt.min()) > 0.4 and float(dt.max()) < 1.0
    if model.startswith("dpmamba"):
        assert not torch.equal(masknet.dual_mdl[0].intra_mdl.layers[0].mixer.in_proj.weight,
                               masknet.dual_mdl[1].intra_mdl.layers[0].mixer.in_proj.weight)


def test_reinit_none_leaves_identical_dual_path_layers(tmp_path):
    masknet = load_recipe("WSJ0Mix", "dpmamba_xs", tmp_path, reinit_scheme="none")["modules"]["masknet"]
    first, second = masknet.dual_mdl[0].intra_mdl, masknet.dual_mdl[1].intra_mdl
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert bool(in_dt_range(dt_values(masknet)).all())


def test_reinit_is_seeded(tmp_path):
    first = load_recipe("WHAM", "dpmamba_xs", tmp_path)["modules"]["masknet"].state_dict()
    second = load_recipe("WHAM", "dpmamba_xs", tmp_path)["modules"]["masknet"].state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_reinit_rejects_unknown_scheme(tmp_path):
    with pytest.raises(ValueError, match="reinit"):
        load_recipe("WSJ0Mix", "dpmamba_xs", tmp_path, reinit_scheme="xavier")


# ----------------------------------------------------------------------------------------------------------------
# The files without a debug run: load and one forward pass of a 0.25 s mixture.
# ----------------------------------------------------------------------------------------------------------------

# The model files are shared by the recipes (hparams/<model>.yaml, checked above in every recipe), so each
# model without a debug run gets one forward pass, in one of the recipes in turn.
_NOT_RUN = [model for model in MAMBA_MODELS + BASELINES if model not in {run[1] for run in DEBUG_RUNS}]
FORWARD_ONLY = [(list(RECIPES)[i % len(RECIPES)], model) for i, model in enumerate(_NOT_RUN)]
FORWARD_ONLY += [("LibriMix", "sepmamba_m"), ("WHAM", "sepmamba_causal_m")]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads made these forward passes up to 7x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe, model", FORWARD_ONLY)
def test_forward_of_a_short_mixture(recipe, model, tmp_path, one_thread):
    hparams = load_recipe(recipe, model, tmp_path)
    for module in hparams["modules"].values():
        module.eval()
    mixture = torch.randn(1, 2000) * 0.1
    with torch.no_grad():
        estimates = separate_mixture(hparams["modules"], mixture, hparams["num_spks"])
    assert estimates.shape == (1, 2000, 2)
    assert bool(torch.isfinite(estimates).all())


# ----------------------------------------------------------------------------------------------------------------
# End to end: train.py --debug on the demo corpus.
# ----------------------------------------------------------------------------------------------------------------


def _debug_run(workdir: Path, demo_folder: Path, recipe: str, model: str, extra: Tuple[str, ...]):
    output = workdir / "out" / recipe / model
    command = [
        sys.executable, str(REPO_ROOT / "recipes" / recipe / "separation" / "train.py"),
        str(hparams_path(recipe, model)), *DEBUG_ARGS, *extra,
        "--output_folder", str(output), "--demo_folder", str(demo_folder),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        # Two runs at a time on two cores: one thread each.
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    return output, result


@pytest.fixture(scope="module")
def debug_runs(request, tmp_path_factory) -> Dict[Tuple[str, str], Tuple[Path, subprocess.CompletedProcess]]:
    """The selected debug runs, two at a time, after building their demo corpora (runs must not race to build)."""
    selected = {
        (item.callspec.params["recipe"], item.callspec.params["model"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_debug_run_on_the_demo_corpus"
    }
    runs = [run for run in DEBUG_RUNS if run[:2] in selected]
    workdir = tmp_path_factory.mktemp("recipe_runs")
    demo_folder = workdir / "demo_data"
    for layout in sorted({RECIPES[recipe] for recipe, _, _ in runs}):
        # Where recipe.demo_overrides looks: <demo_folder>/<layout>_<num_spks>spk.
        build_demo_dataset(demo_folder / f"{layout}_2spk", layout=layout, num_spks=2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            (recipe, model): pool.submit(_debug_run, workdir, demo_folder, recipe, model, extra)
            for recipe, model, extra in runs
        }
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("recipe, model", [run[:2] for run in DEBUG_RUNS])
def test_debug_run_on_the_demo_corpus(recipe, model, debug_runs):
    output, result = debug_runs[(recipe, model)]
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    with open(output / "test_results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == RESULT_COLUMNS
    assert len(rows) >= 3  # at least one test mixture and the average
    assert rows[-1][0] == "avg"
    assert all(math.isfinite(float(value)) for row in rows[1:] for value in row[1:])
    assert (output / "train_log.txt").is_file() and (output / "hyperparams.yaml").is_file()


def test_a_bad_hyperparameter_stops_with_one_clear_line(tmp_path, monkeypatch, caplog):
    from speechbrain_mamba.separation.recipe import main

    monkeypatch.chdir(tmp_path)  # the demo corpus goes below the working directory
    hparams = REPO_ROOT / "recipes" / "WSJ0Mix" / "separation" / "hparams" / "dpmamba_xs.yaml"
    with pytest.raises(SystemExit) as stop:
        main([str(hparams), "--output_folder", str(tmp_path / "out"), "--checkpoint_blocks", "maybe"])
    assert stop.value.code == 2 and isinstance(stop.value.__cause__, ValueError)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"Bad hyperparameters, stopping before training: {hparams}: "
                      "checkpoint_blocks must be True or False; got 'maybe'."]
