"""What every separation recipe's train.py runs: data, Brain, training, test.

``python train.py hparams/<model>.yaml [--data_folder ...] [overrides]``. With
no ``data_folder`` (neither in the file nor on the command line) the recipe
runs on the embedded demo corpus, built in the corpus's own layout, with the
short schedule of ``DEMO_OVERRIDES`` applied to the keys the file defines.
"""

import dataclasses
import math
import os
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from ruamel.yaml import YAML
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataio import read_audio
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.distributed import ddp_init_group, run_on_main

from speechbrain_mamba.separation.brain import Separation, check_loss_threshold
from speechbrain_mamba.separation.data_prep import DataError, list_speaker_utterances, prepare_data
from speechbrain_mamba.separation.demo import build_demo_dataset
from speechbrain_mamba.separation.dynamic_mixing import DynamicMixingDataset
from speechbrain_mamba.utils.cpu import keep_freed_memory

logger = logging.getLogger(__name__)

# A run on the demo corpus that trains, validates and tests in under 10 minutes on a 2-core CPU. Short
# segments: early in training, separation quality grows with optimizer steps far more than with segment
# length (a sweep of 0.25-2 s segments and lr 1e-3..4e-3 on DPMamba-XS gave about the same SI-SNR per
# step), and a 0.25 s step is the cheapest. One epoch: each validation pass costs as much as ~15 steps.
# Validation and test run on the full-length demo mixtures.
DEMO_OVERRIDES = {
    "number_of_epochs": 1,
    "mixtures_per_epoch": 200,
    "training_signal_len": 2000,
    "batch_size": 1,
    "lr": 0.002,
    "lr_warmup_steps": 10,
    "precision": "fp32",
    "num_workers": 0,
}
# The single-speaker corpus dynamic mixing reads, by dataset.
DM_CORPUS = {"wsj0mix": "wsj0", "wham": "wsj0", "librimix": "librispeech", "custom": "wsj0"}


def _top_level_keys(hparams_file: str) -> Dict[str, object]:
    with open(hparams_file) as handle:
        return dict(YAML(typ="rt").load(handle) or {})


def demo_overrides(hparams_file: str, overrides: Dict[str, object]) -> Dict[str, object]:
    """Overrides that point a recipe without data at the demo corpus (empty if it has data)."""
    defaults = _top_level_keys(hparams_file)
    if overrides.get("data_folder", defaults.get("data_folder")) is not None:
        return {}
    layout = defaults.get("dataset", "wsj0mix")
    num_spks = int(overrides.get("num_spks", defaults.get("num_spks", 2)))
    demo_folder = overrides.get("demo_folder", defaults.get("demo_folder")) or "results/demo_data"
    demo_root = Path(str(demo_folder)) / f"{layout}_{num_spks}spk"
    run_on_main(build_demo_dataset, kwargs={"output_folder": demo_root, "layout": layout, "num_spks": num_spks})
    demo = build_demo_dataset(demo_root, layout=layout, num_spks=num_spks)  # built: returns the paths
    logger.info(f"No data_folder given: running on the embedded demo corpus ({demo.data_folder}).")
    chosen = {k: v for k, v in DEMO_OVERRIDES.items() if k in defaults and k not in overrides}
    return {**chosen, "data_folder": str(demo.data_folder), "dm_folder": str(demo.dm_folder)}


def csv_dataset(csv_path: Path, num_spks: int) -> DynamicItemDataset:
    """Mixture [T] and sources [T, num_spks] read from a prepared CSV."""
    dataset = DynamicItemDataset.from_csv(csv_path)
    source_keys = [f"s{i + 1}_wav" for i in range(num_spks)]

    @sb.utils.data_pipeline.takes("mix_wav", *source_keys)
    @sb.utils.data_pipeline.provides("mixture", "sources")
    def audio_pipeline(mix_wav, *source_paths):
        yield read_audio(mix_wav)
        yield torch.stack([read_audio(path) for path in source_paths], dim=-1)

    dataset.add_dynamic_item(audio_pipeline)
    dataset.set_output_keys(["id", "mixture", "sources"])
    return dataset


def noise_files(csv_path: Path) -> List[str]:
    """The noise recordings listed in a prepared CSV (noisy corpora), else []."""
    dataset = DynamicItemDataset.from_csv(csv_path)
    return sorted({dataset.data[key]["noise_wav"] for key in dataset.data_ids if "noise_wav" in dataset.data[key]})


def planned_optimizer_steps(
    num_epochs: int, items_per_epoch: int, batch_size: int, world_size: int = 1, grad_accumulation: int = 1
) -> int:
    """Optimizer steps of one process over a run: what a per-step learning-rate schedule should span.

    Each of ``world_size`` processes gets ``ceil(items / world_size)`` items per epoch (the distributed
    sampler pads), in batches of ``batch_size``, and steps once per ``grad_accumulation`` batches.

    Arguments
    ---------
    num_epochs : int
        Epochs of the run.
    items_per_epoch : int
        Training items (mixtures) per epoch, over all processes.
    batch_size : int
        Items per batch of one process.
    world_size : int
        DDP processes.
    grad_accumulation : int
        Batches per optimizer step.

    Returns
    -------
    int
        The number of optimizer steps.

    Example
    -------
    >>> planned_optimizer_steps(200, 20000, 1, world_size=4)
    1000000
    >>> planned_optimizer_steps(1, 1001, 2, grad_accumulation=2)
    250
    """
    batches = math.ceil(math.ceil(items_per_epoch / world_size) / batch_size)
    return num_epochs * (batches // grad_accumulation)


def _check_schedule_length(hparams: dict, brain: Separation, train_set) -> None:
    """Warns when the per-step schedule's ``lr_total_steps`` is not the run's number of optimizer steps (fixed
    in the hparams for dynamic mixing on one process, it is off without dynamic mixing, under DDP and with
    gradient accumulation): the learning rate would reach its floor early, or never."""
    total = hparams.get("lr_total_steps")
    if total is None or hparams.get("lr_step_scheduler") is None or brain.debug:
        return
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    steps = planned_optimizer_steps(hparams["epoch_counter"].limit, len(train_set), hparams["batch_size"],
                                    world_size, brain.grad_accumulation_factor)
    if abs(total - steps) > 0.05 * steps:
        logger.warning(
            f"lr_total_steps={total:g}, but this run makes {steps} optimizer steps per process "
            f"({len(train_set)} mixtures per epoch, batch_size {hparams['batch_size']}, {world_size} process(es), "
            f"grad_accumulation_factor {brain.grad_accumulation_factor}): the learning-rate schedule ends "
            f"{'before' if total < steps else 'after'} training; pass --lr_total_steps {steps} to match it"
        )


class HparamsError(Exception):
    """A module of the hparams file refused its arguments (the ``ValueError`` is the ``__cause__``)."""


class RecipeError(Exception):
    """A recipe argument that cannot work (unknown dataset, unsupported num_spks, no model to test, ...)."""


def main(argv: Optional[List[str]] = None) -> None:
    """Runs a recipe: ``main(["hparams/dpmamba_m.yaml", "--data_folder", ...])``.

    Bad input data (a ``DataError``: the message names the file or folder and what was expected), a
    bad hyperparameter (a ``ValueError`` of a module built by the hparams file, naming its argument) or a
    recipe argument that cannot work (a ``RecipeError``: unknown dataset, unsupported num_spks, dynamic
    mixing without dm_folder, a test without a checkpoint to test) ends the run with that message as one
    error line, no traceback, and ``SystemExit(2)`` (the error is its ``__cause__``). A finished
    distributed run (under ``torchrun``) ends its process here with status 0.
    """
    distributed = False
    try:
        _run(argv)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    except DataError as error:
        logger.error(f"Bad input data, stopping before training: {error}")
        raise SystemExit(2) from error
    except HparamsError as error:
        logger.error(f"Bad hyperparameters, stopping before training: {error}")
        raise SystemExit(2) from error.__cause__
    except RecipeError as error:
        logger.error(f"Cannot run the recipe: {error}")
        raise SystemExit(2) from error
    finally:
        # Left to interpreter shutdown, the process group's threads can abort the process (SIGABRT).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if distributed:
        # Even so, gloo sometimes aborts at interpreter shutdown ("terminate called without an active
        # exception") after everything is written, and torchrun then reports the finished run as failed:
        # a finished distributed process (this is its entry point) ends here, with status 0.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run(argv: Optional[List[str]]) -> None:
    keep_freed_memory()  # ~2x faster CPU training (see speechbrain_mamba.utils.cpu)
    hparams_file, run_opts, overrides_yaml = sb.parse_arguments(sys.argv[1:] if argv is None else argv)
    ddp_init_group(run_opts)  # under torchrun (RANK and LOCAL_RANK set); nothing otherwise
    overrides = dict(YAML(typ="safe").load(overrides_yaml) or {}) if overrides_yaml else {}
    overrides.update(demo_overrides(hparams_file, overrides))
    if "demo_folder" not in _top_level_keys(hparams_file):
        overrides.pop("demo_folder", None)  # a recipe option, not a key of every hparams file
    with open(hparams_file) as handle:
        try:
            hparams = load_hyperpyyaml(handle, overrides)
            check_loss_threshold(hparams.get("loss_threshold"))
        except ValueError as error:
            raise HparamsError(f"{hparams_file}: {error}") from error
    # Evaluate in the training precision unless told otherwise (the stock recipe always used fp32).
    # run_opts is a frozen RunOptions; Brain takes a run option over the hparams only if it is in overridden_args.
    if "eval_precision" not in run_opts.overridden_args and "eval_precision" not in hparams:
        from_command_line = "precision" in run_opts.overridden_args
        run_opts = dataclasses.replace(
            run_opts,
            eval_precision=run_opts.precision if from_command_line else hparams.get("precision", "fp32"),
            overridden_args=run_opts.overridden_args | {"eval_precision"},
        )

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    num_spks = hparams["num_spks"]
    prep_kwargs = dict(
        dataset=hparams["dataset"], data_folder=hparams["data_folder"], save_folder=hparams["save_folder"],
        num_spks=num_spks, sample_rate=hparams["sample_rate"], skip_prep=hparams.get("skip_prep", False),
        **hparams.get("data_prep_options", {}),
    )
    if hparams.get("dynamic_mixing", False) and not hparams.get("dm_folder"):
        raise RecipeError("dynamic_mixing: True needs dm_folder, the folder of single-speaker utterances to mix")
    try:
        run_on_main(prepare_data, kwargs=prep_kwargs)
    except DataError:
        raise
    except ValueError as error:  # an argument the corpus does not take (dataset, num_spks, version, ...)
        raise RecipeError(f"data preparation: {error}") from error
    csvs = prepare_data(**{**prep_kwargs, "skip_prep": True})

    if hparams.get("dynamic_mixing", False):
        train_set = DynamicMixingDataset(
            list_speaker_utterances(hparams["dm_folder"], DM_CORPUS[hparams["dataset"]]),
            num_spks=num_spks,
            num_mixtures=hparams["mixtures_per_epoch"],
            sample_rate=hparams["sample_rate"],
            segment_length=hparams.get("training_signal_len"),
            speeds=hparams.get("speed_perturb_speeds", [100]),
            noise_files=noise_files(csvs["train"]),
            seed=hparams["seed"],
        )
    else:
        train_set = csv_dataset(csvs["train"], num_spks)
    valid_set, test_set = csv_dataset(csvs["valid"], num_spks), csv_dataset(csvs["test"], num_spks)

    brain = Separation(
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.train_dataset = train_set
    _check_schedule_length(hparams, brain, train_set)
    loader = {
        "batch_size": hparams["batch_size"],
        "num_workers": hparams.get("num_workers", 0),
        "collate_fn": PaddedBatch,  # also for the dynamic-mixing dataset
    }
    brain.fit(
        hparams["epoch_counter"],
        train_set,
        valid_set,
        train_loader_kwargs={**loader, "shuffle": True},
        valid_loader_kwargs={**loader, "batch_size": 1},
    )
    # Without a checkpoint (--test_only on a new folder), evaluate() would test the random initialisation.
    if brain.checkpointer.find_checkpoint(min_key="si-snr") is None:
        raise RecipeError(f"{brain.checkpointer.checkpoints_dir}: no checkpoint to test; train first "
                          "(without --test_only) or point --output_folder at a trained experiment")
    brain.evaluate(test_set, min_key="si-snr", test_loader_kwargs={**loader, "batch_size": 1})
