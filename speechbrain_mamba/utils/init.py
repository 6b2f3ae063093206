"""Re-initialisation of a model after construction, as a recipe switch.

Two things make this necessary for dual-path models:

* SpeechBrain's ``Dual_Path_Model`` deep-copies its ``intra_model`` and
  ``inter_model`` templates for every layer, so without a reset all layers
  start with *identical* weights.
* The authors' public DPMamba / Mamba-TasNet recipe resets every submodule
  that has ``reset_parameters()`` (their ``reset_layer_recursively``) after
  construction. That gives every layer its own draw, but it also replaces
  Mamba's ``dt_proj`` bias (softplus(bias) log-uniform in [1e-3, 0.1]) by
  PyTorch's default Linear bias (softplus(bias) about 0.5-0.9), and undoes the
  ``1/sqrt(num_layers)`` rescale of each block's ``out_proj``. The published
  numbers were obtained that way.

:func:`reinitialize` offers both behaviours, and a third that draws every
layer anew with Mamba's own initialisation.
"""

import math

import torch
import torch.nn as nn

SCHEMES = ("none", "pytorch", "mamba")


def _reset_pytorch_defaults(module: nn.Module) -> None:
    """Calls ``reset_parameters()`` on every submodule that has one (the published behaviour)."""
    for submodule in module.modules():
        reset = getattr(submodule, "reset_parameters", None)
        if callable(reset):
            reset()


@torch.no_grad()
def _reset_mamba(module: nn.Module) -> None:
    """Mamba's own initialisation of every mixer and the out_proj rescale of every Mamba stack."""
    # Imported here: lobes import ops, which must not be needed to use the "none"/"pytorch" schemes.
    from speechbrain_mamba.lobes import BiMamba, Mamba, MambaStack

    for submodule in module.modules():
        if isinstance(submodule, Mamba):  # BiMamba is a Mamba too
            submodule._reset_direction("")
            if isinstance(submodule, BiMamba):
                submodule._reset_direction("_b")
    for submodule in module.modules():
        if isinstance(submodule, MambaStack):
            scale = math.sqrt(len(submodule.layers))
            for layer in submodule.layers:
                layer.mixer.out_proj.weight /= scale


def reinitialize(module: nn.Module, scheme: str = "mamba") -> nn.Module:
    """Re-draws the parameters of ``module`` in place, after construction.

    Schemes:

    * ``"none"``: leaves the module as constructed. In a ``Dual_Path_Model``
      all layers then start with identical weights (deep copies of one
      template).
    * ``"pytorch"``: calls ``reset_parameters()`` of every submodule that has
      one: PyTorch's default initialisation, a new draw per layer. This is the
      authors' public DPMamba recipe, with which the published numbers were
      obtained; it overwrites Mamba's dt initialisation (the ``dt_proj`` bias
      gets PyTorch's uniform default, so the initial step sizes softplus(bias)
      are about 0.5-0.9 instead of 0.001-0.1) and the ``out_proj`` rescale.
      Parameters held directly by a module without ``reset_parameters``
      (``A_log``, ``D``, RMSNorm weights) keep their values.
    * ``"mamba"``: the same, then Mamba's own initialisation again for every
      :class:`~speechbrain_mamba.lobes.Mamba` and
      :class:`~speechbrain_mamba.lobes.BiMamba` (both directions: ``dt_proj``
      weight and bias, ``A_log``, ``D``) and the ``1/sqrt(num_layers)``
      rescale of each :class:`~speechbrain_mamba.lobes.MambaStack` block's
      ``out_proj``. Every layer gets its own random draw with the correct dt
      initialisation.

    The draws come from PyTorch's global generator, so a seeded run is
    reproducible.

    Arguments
    ---------
    module : torch.nn.Module
        The model (or part of it, e.g. a recipe's ``MaskNet``) to re-initialise.
    scheme : str
        ``"none"``, ``"pytorch"`` or ``"mamba"``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself, re-initialised in place.

    Example
    -------
    >>> import torch.nn.functional as F
    >>> from speechbrain_mamba.lobes import DualPathModel, MambaStack
    >>> _ = torch.manual_seed(0)
    >>> masknet = DualPathModel(
    ...     16, 16, MambaStack(16), MambaStack(16), num_layers=2, K=10,
    ...     linear_layer_after_inter_intra=False,
    ... )
    >>> def mixer(layer):
    ...     return masknet.dual_mdl[layer].intra_mdl.layers[0].mixer
    >>> torch.equal(mixer(0).in_proj.weight, mixer(1).in_proj.weight)  # deep copies
    True
    >>> _ = reinitialize(masknet, "mamba")
    >>> torch.equal(mixer(0).in_proj.weight, mixer(1).in_proj.weight)
    False
    >>> dt = F.softplus(mixer(0).dt_proj_b.bias)
    >>> bool(dt.min() > 0.00099 and dt.max() < 0.1001)
    True
    >>> _ = reinitialize(masknet, "pytorch")  # the published recipe: dt init lost
    >>> bool(F.softplus(mixer(0).dt_proj_b.bias).min() > 0.1)
    True
    """
    if scheme not in SCHEMES:
        raise ValueError(f"reinitialize: scheme={scheme!r}; expected one of {', '.join(map(repr, SCHEMES))}")
    if scheme == "none":
        return module
    _reset_pytorch_defaults(module)
    if scheme == "mamba":
        _reset_mamba(module)
    return module
