"""The separation forward shared by training, evaluation and inference."""

from typing import Mapping

import torch
import torch.nn.functional as F


def separate_mixture(modules: Mapping[str, torch.nn.Module], mixture: torch.Tensor, num_spks: int) -> torch.Tensor:
    """Separates a batch of mixtures: [batch, time] -> [batch, time, num_spks].

    Masking models (``encoder``, ``masknet``, ``decoder`` in ``modules``):
    masks over the encoded mixture, one decoded waveform per mask. Direct
    waveform models (``model``, e.g. SepMamba) map the mixture to
    [batch, time, num_spks] themselves. Outputs are cropped or zero-padded
    to the mixture's length.

    Arguments
    ---------
    modules : Mapping[str, torch.nn.Module]
        ``encoder``/``masknet``/``decoder``, or ``model``.
    mixture : torch.Tensor
        [batch, time] waveforms.
    num_spks : int
        Number of sources to return.

    Returns
    -------
    torch.Tensor
        [batch, time, num_spks] estimated sources.

    Example
    -------
    >>> from speechbrain.lobes.models.dual_path import Decoder, Encoder
    >>> from speechbrain_mamba.lobes import MambaTasNetMaskNet
    >>> modules = {"encoder": Encoder(16, 8), "masknet": MambaTasNetMaskNet(8, 1),
    ...            "decoder": Decoder(8, 1, 16, stride=8, bias=False)}
    >>> separate_mixture(modules, torch.randn(2, 1001), num_spks=2).shape
    torch.Size([2, 1001, 2])
    """
    if "model" in modules:
        estimates = modules["model"](mixture)
    else:
        mix_w = modules["encoder"](mixture)
        masked = modules["masknet"](mix_w) * mix_w.unsqueeze(0)
        estimates = torch.stack([modules["decoder"](masked[i]) for i in range(num_spks)], dim=-1)
    length = mixture.shape[-1]
    if estimates.shape[1] < length:
        estimates = F.pad(estimates, (0, 0, 0, length - estimates.shape[1]))
    return estimates[:, :length]


class SeparationForward(torch.nn.Module):
    """:func:`separate_mixture` as a module: one callable holding every parameter of the separation
    (what :class:`~speechbrain_mamba.utils.cuda_graphs.TrainingCUDAGraphs` records).

    Arguments
    ---------
    modules : Mapping[str, torch.nn.Module]
        ``encoder``/``masknet``/``decoder``, or ``model``.
    num_spks : int
        Number of sources to return.

    Example
    -------
    >>> from speechbrain_mamba.lobes import SepMamba
    >>> forward = SeparationForward({"model": SepMamba(dim=4, num_layers=1)}, num_spks=2)
    >>> forward(torch.randn(1, 1000)).shape
    torch.Size([1, 1000, 2])
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], num_spks: int):
        super().__init__()
        self.separation_modules = torch.nn.ModuleDict(dict(modules))
        self.num_spks = num_spks

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        return separate_mixture(self.separation_modules, mixture, self.num_spks)
