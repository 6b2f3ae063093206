"""Strict loading of per-module checkpoints, including Mamba-TasNet's released ones.

SpeechBrain's checkpointer saves one plain state dict per recoverable
(``encoder.ckpt``, ``masknet.ckpt``, ``decoder.ckpt``, ...). SpeechBrain's own
pretrained loader is lenient: a missing or unexpected key only logs a warning
and leaves the model half-initialised. Here every key and every shape must
match, or a :class:`CheckpointMismatchError` names the file and the keys.

Mamba-TasNet's released checkpoints (github.com/xi-j/Mamba-TasNet,
``ckpts/WSJ0Mix/<model>/1234/save/CKPT+.../``): DPMamba's files already have
this package's key layout (SpeechBrain's ``Dual_Path_Model`` with the Mamba
stack as intra and inter model, e.g.
``dual_mdl.0.intra_mdl.layers.0.mixer.conv1d_b.weight``); the single-path
Mamba-TasNet mask network has other names and 1x1 convolutions where
:class:`~speechbrain_mamba.lobes.MambaTasNetMaskNet` has linear layers, and is
converted on loading by :func:`mamba_tasnet_masknet_state_dict`.
"""

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from speechbrain.utils.checkpoints import hook_on_loading_state_dict_checkpoint

from speechbrain_mamba.lobes import MambaTasNetMaskNet

PathLike = Union[str, os.PathLike]
# Released Mamba-TasNet mask network -> MambaTasNetMaskNet: name prefixes.
_MAMBA_TASNET_PREFIXES = {
    "layer_norm.gamma": "norm.weight",
    "layer_norm.beta": "norm.bias",
    "bottleneck_conv1x1.conv.": "bottleneck.",
    "mamba_net.": "mamba.",
    "mask_conv1x1.conv.": "mask_proj.",
}


class CheckpointMismatchError(RuntimeError):
    """A checkpoint file whose keys or shapes do not match the module it is loaded into."""


def mamba_tasnet_masknet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Converts a released Mamba-TasNet mask network state dict to :class:`MambaTasNetMaskNet`'s layout.

    ``layer_norm.gamma``/``beta`` [1, 1, N] (channel-wise layer norm) become
    ``norm.weight``/``bias`` [N]; the 1x1 convolutions
    ``bottleneck_conv1x1.conv.weight`` and ``mask_conv1x1.conv.weight``
    [out, in, 1] become the linear layers ``bottleneck.weight`` and
    ``mask_proj.weight`` [out, in]; ``mamba_net.*`` (the Mamba stack) becomes
    ``mamba.*`` unchanged. Keys it does not know are kept as they are (and
    then reported by the strict loading).

    Note: the released model normalises with eps 1e-8 (SpeechBrain's
    ``ChannelwiseLayerNorm``), ``MambaTasNetMaskNet`` with ``nn.LayerNorm``'s
    1e-5; the difference only shows on frames of near-zero variance.

    Arguments
    ---------
    state_dict : Mapping[str, torch.Tensor]
        The contents of a released ``masknet.ckpt``.

    Returns
    -------
    Dict[str, torch.Tensor]
        The same tensors under this package's names and shapes.

    Example
    -------
    >>> released = {"layer_norm.gamma": torch.ones(1, 1, 4), "mask_conv1x1.conv.weight": torch.ones(8, 4, 1),
    ...             "mamba_net.norm_f.weight": torch.ones(4)}
    >>> {k: tuple(v.shape) for k, v in mamba_tasnet_masknet_state_dict(released).items()}
    {'norm.weight': (4,), 'mask_proj.weight': (8, 4), 'mamba.norm_f.weight': (4,)}
    """
    converted = {}
    for key, value in state_dict.items():
        for old, new in _MAMBA_TASNET_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                if new.startswith("norm."):
                    value = value.reshape(-1)
                elif new in ("bottleneck.", "mask_proj.") and value.dim() == 3:
                    value = value.squeeze(-1)
                break
        converted[key] = value
    return converted


def load_checkpoint_strict(module: torch.nn.Module, path: PathLike) -> None:
    """Loads the state dict saved at ``path`` into ``module``; every key and shape must match.

    Also the parameter-transfer hook of the inference folders written by
    :func:`~speechbrain_mamba.inference.export_model` (``custom_hooks`` of
    their ``Pretrainer``). A released Mamba-TasNet mask network is converted
    first (:func:`mamba_tasnet_masknet_state_dict`).

    Arguments
    ---------
    module : torch.nn.Module
        The module to load into.
    path : str or os.PathLike
        A state dict saved with ``torch.save`` (SpeechBrain's checkpointer does this).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    CheckpointMismatchError
        If the file is not a state dict ``torch.load`` reads, or keys are
        missing, unexpected or of another shape; the message names the file
        (and the module and the keys).

    Example
    -------
    >>> path = getfixture("tmp_path") / "layer.ckpt"
    >>> torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    >>> load_checkpoint_strict(torch.nn.Linear(3, 2), path)
    >>> load_checkpoint_strict(torch.nn.Linear(3, 2, bias=False), path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    speechbrain_mamba.inference.checkpoints.CheckpointMismatchError: .../layer.ckpt does not match Linear: keys in ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state_dict = torch.load(path, map_location="cpu")
    except Exception as error:  # truncated or garbage files raise anything from OSError to UnpicklingError
        # The first sentence says what failed; the rest of torch's weights_only message is advice for trusted pickles.
        first = str(error).strip().split(". ")[0].split("\n")[0]
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        raise CheckpointMismatchError(f"{path}: not a readable PyTorch state dict ({detail})") from error
    if not isinstance(state_dict, Mapping):
        raise CheckpointMismatchError(
            f"{path}: not a readable PyTorch state dict (it holds a {type(state_dict).__name__}, not a mapping)"
        )
    state_dict = hook_on_loading_state_dict_checkpoint(state_dict)  # SpeechBrain's key renames, as it loads
    if isinstance(module, MambaTasNetMaskNet) and any(key.startswith("mamba_net.") for key in state_dict):
        state_dict = mamba_tasnet_masknet_state_dict(state_dict)
    expected = module.state_dict()
    problems = []
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [
        f"{key} (file {tuple(state_dict[key].shape)}, model {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    for what, keys in [
        ("keys of the model missing from the file", missing),
        ("keys in the file but not in the model", unexpected),
        ("shapes differ", reshaped),
    ]:
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise CheckpointMismatchError(f"{path} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict)


def load_module_checkpoints(
    modules: Mapping[str, torch.nn.Module], folder: PathLike, file_names: Optional[Mapping[str, str]] = None
) -> None:
    """Loads ``<folder>/<name>.ckpt`` into each module, strictly (:func:`load_checkpoint_strict`).

    The way to load a SpeechBrain checkpoint folder (``save/CKPT+...``), for
    example one of Mamba-TasNet's released DPMamba or Mamba-TasNet
    checkpoints, into this package's models built from ``hparams/*.yaml``::

        hparams = load_hyperpyyaml(open("hparams/mamba_tasnet_m.yaml"))
        load_module_checkpoints(hparams["modules"], "ckpts/WSJ0Mix/mambatasnet_M/1234/save/CKPT+2024-06-04+23-51-03+00")

    To get a folder that ``MambaSeparator.from_hparams`` and the
    ``speechbrain-mamba-separate`` command load, use
    :func:`~speechbrain_mamba.inference.export_model` instead (it calls this).

    Arguments
    ---------
    modules : Mapping[str, torch.nn.Module]
        Module name -> module (the ``modules`` of a model's hparams).
    folder : str or os.PathLike
        The folder with the checkpoint files.
    file_names : Mapping[str, str], optional
        Module name -> file name without ``.ckpt``, where they differ
        (e.g. the checkpointer's recoverable names).

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> torch.save(torch.nn.Linear(3, 2).state_dict(), folder / "model.ckpt")
    >>> load_module_checkpoints({"model": torch.nn.Linear(3, 2)}, folder)
    """
    file_names = file_names or {}
    for name, module in modules.items():
        load_checkpoint_strict(module, Path(folder) / f"{file_names.get(name, name)}.ckpt")
