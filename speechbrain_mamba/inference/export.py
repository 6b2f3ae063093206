"""Exporting a trained model into an inference folder that ``from_hparams`` loads."""

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from speechbrain.utils.checkpoints import Checkpointer

from speechbrain_mamba.inference.audio import umasked
from speechbrain_mamba.inference.checkpoints import load_module_checkpoints

PathLike = Union[str, os.PathLike]
VALIDATION_KEY = "si-snr"  # the separation Brain's checkpoint meta: validation loss (negative SI-SNR), lower is better
DEFAULT_SAMPLE_RATE = 8000
_PRETRAINER = """
# Every key and shape must match (speechbrain_mamba.inference.load_checkpoint_strict).
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
{loadables}
    custom_hooks:
{hooks}
"""


def find_checkpoint(save_folder: PathLike, which: str = "best") -> Path:
    """The checkpoint folder (``CKPT+...``) of a training run to export.

    Arguments
    ---------
    save_folder : str or os.PathLike
        The run's ``save`` folder (``results/<experiment>/<seed>/save``).
    which : str
        ``"best"``: the lowest validation loss (the ``si-snr`` entry that the
        separation Brain stores with every end-of-epoch checkpoint);
        ``"latest"``: the most recent checkpoint.

    Returns
    -------
    Path
        The checkpoint folder.

    Example
    -------
    >>> save = getfixture("tmp_path")
    >>> checkpointer = Checkpointer(save, {"layer": torch.nn.Linear(2, 2)})
    >>> first = checkpointer.save_checkpoint(meta={"si-snr": -12.0}, name="first").path
    >>> second = checkpointer.save_checkpoint(meta={"si-snr": -9.0}, name="second").path
    >>> find_checkpoint(save, "best").name, find_checkpoint(save, "latest").name
    ('CKPT+first', 'CKPT+second')
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which checkpoint: 'best' or 'latest', not {which!r}")
    save_folder = Path(save_folder)
    if not save_folder.is_dir():
        raise FileNotFoundError(f"{save_folder}: no such folder (a training run's save folder was expected)")
    checkpointer = Checkpointer(save_folder)
    checkpoint = checkpointer.find_checkpoint(**({"min_key": VALIDATION_KEY} if which == "best" else {}))
    if checkpoint is None and not checkpointer.list_checkpoints():
        raise FileNotFoundError(f"{save_folder}: no checkpoint (CKPT+*/CKPT.yaml)")
    if checkpoint is None:
        raise FileNotFoundError(
            f"{save_folder}: no checkpoint with a '{VALIDATION_KEY}' entry (validation loss) to choose the best by; "
            "to export the latest, use which='latest' (--checkpoint latest)"
        )
    return Path(checkpoint.path)


def export_model(
    source: PathLike,
    output: PathLike,
    hparams_file: Optional[PathLike] = None,
    checkpoint: str = "best",
    overwrite: bool = False,
) -> Path:
    """Writes an inference folder: ``hyperparams.yaml`` plus one ``<module>.ckpt`` per module.

    The folder loads with ``MambaSeparator.from_hparams(source=output)`` (any
    SpeechBrain ``Pretrained`` class, as its ``hyperparams.yaml`` defines
    ``modules``, ``pretrainer``, ``num_spks`` and ``sample_rate``) and with the
    ``speechbrain-mamba-separate`` command. The model definition is the
    ``modules`` entry of the hparams, with every object it refers to; the
    weights are loaded strictly (:func:`load_module_checkpoints`) before
    anything is written, and the folder appears only once complete, with the
    usual modes of new folders and files (``0o777``/``0o666`` less the umask).

    Arguments
    ---------
    source : str or os.PathLike
        A training run, ``results/<experiment>/<seed>`` (with its
        ``hyperparams.yaml`` and ``save/CKPT+*``), or one checkpoint folder
        (``CKPT+...``, or a folder of ``<name>.ckpt`` files such as a
        Mamba-TasNet release).
    output : str or os.PathLike
        The inference folder to write.
    hparams_file : str or os.PathLike, optional
        The model definition to use instead of ``<source>/hyperparams.yaml``:
        needed for a checkpoint folder, and for runs of other code, e.g.
        ``hparams/mamba_tasnet_m.yaml`` for Mamba-TasNet's released
        ``ckpts/WSJ0Mix/mambatasnet_M/1234``. Checkpoint files are named after
        its checkpointer's recoverables if it has a checkpointer, else after
        the modules.
    checkpoint : str
        For a training run: ``"best"`` (lowest validation loss) or ``"latest"``.
    overwrite : bool
        Replace ``output`` if it exists (otherwise that is an error).

    Returns
    -------
    Path
        The inference folder.

    Example
    -------
    >>> from speechbrain_mamba.lobes import SepMamba
    >>> tmp = getfixture("tmp_path")
    >>> _ = (tmp / "model.yaml").write_text(
    ...     "num_spks: 2\\nmodel: !new:speechbrain_mamba.lobes.SepMamba {dim: 4, num_layers: 1}\\n"
    ...     "modules: {model: !ref <model>}\\n")
    >>> (tmp / "weights").mkdir()
    >>> torch.save(SepMamba(dim=4, num_layers=1).state_dict(), tmp / "weights" / "model.ckpt")
    >>> folder = export_model(tmp / "weights", tmp / "inference", hparams_file=tmp / "model.yaml")
    >>> sorted(path.name for path in folder.iterdir())
    ['hyperparams.yaml', 'model.ckpt']
    """
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder (a training run or a checkpoint folder was expected)")
    checkpoint_folder = find_checkpoint(source / "save", checkpoint) if (source / "save").is_dir() else source
    hparams_file = Path(hparams_file) if hparams_file is not None else source / "hyperparams.yaml"
    if not hparams_file.is_file():
        raise FileNotFoundError(
            f"{hparams_file}: no such file; give the model's hparams file (hparams_file=, --hparams) "
            "unless the source is a training run (results/<experiment>/<seed> with hyperparams.yaml and save/)"
        )
    with open(hparams_file) as handle:
        tree = YAML(typ="rt").load(resolve_references(handle))
    text = f"# Exported by speechbrain_mamba.inference.export_model from {source}\n"
    text += f"#   weights: {checkpoint_folder}\n#   model: {hparams_file}\n"
    text += _inference_hparams(tree, hparams_file)
    hparams = load_hyperpyyaml(text)
    load_module_checkpoints(hparams["modules"], checkpoint_folder, _checkpoint_names(tree, hparams_file))

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        (staging / "hyperparams.yaml").write_text(text)
        for name, module in hparams["modules"].items():
            torch.save(module.state_dict(), staging / f"{name}.ckpt")
        os.chmod(staging, umasked(0o777))  # mkdtemp's 0700 would hide the model from other users
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _inference_hparams(tree: CommentedMap, hparams_file: Path) -> str:
    """The inference hyperparams.yaml: sample_rate, num_spks, modules (with what they use), pretrainer."""
    modules = tree.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f"{hparams_file}: no 'modules' entry (module name -> module) to export")
    if "num_spks" not in tree:
        raise ValueError(f"{hparams_file}: no 'num_spks' entry (the number of sources the model separates)")
    kept = CommentedMap()
    kept["sample_rate"] = tree.get("sample_rate", DEFAULT_SAMPLE_RATE)
    kept["num_spks"] = tree["num_spks"]
    kept["modules"] = modules
    stream = io.StringIO()
    YAML(typ="rt").dump(kept, stream)
    return stream.getvalue() + _PRETRAINER.format(
        loadables="\n".join(f"        {name}: !ref <modules[{name}]>" for name in modules),
        hooks="\n".join(
            f"        {name}: !name:speechbrain_mamba.inference.checkpoints.load_checkpoint_strict" for name in modules
        ),
    )


def _checkpoint_names(tree: CommentedMap, hparams_file: Path) -> Dict[str, str]:
    """Module name -> checkpoint file stem: the checkpointer's recoverable holding the same object, if any."""
    checkpointer = tree.get("checkpointer")
    recoverables = checkpointer.get("recoverables", {}) if isinstance(checkpointer, dict) else {}
    if not recoverables:
        return {}
    names = {}
    for name, module in tree["modules"].items():
        matches = [key for key, value in recoverables.items() if value is module]
        if not matches:
            raise ValueError(f"{hparams_file}: module '{name}' is not among the checkpointer's recoverables")
        names[name] = matches[0]
    return names
