"""Dual-path mask networks: SpeechBrain's Dual_Path_Model with a fast norm and on-device padding."""

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from speechbrain.lobes.models.dual_path import Dual_Path_Model

from speechbrain_mamba.lobes.norms import replace_single_group_norms


class DualPathModel(Dual_Path_Model):
    """SpeechBrain's ``Dual_Path_Model`` whose ``GroupNorm(1, N)`` norms are
    :class:`~speechbrain_mamba.lobes.norms.SingleGroupNorm`, and whose chunk
    padding is made on the input's device (the stock one builds zeros on the
    CPU and copies them over, which also rules out capturing CUDA graphs).

    Same arguments, same outputs (up to float rounding), same state-dict keys:
    checkpoints of ``Dual_Path_Model`` load unchanged. With Mamba stacks as
    intra and inter models this is DPMamba's mask network.

    Arguments
    ---------
    in_channels : int
        Channels of the encoder output.
    out_channels : int
        Channels inside the dual-path blocks.
    intra_model : torch.nn.Module
        Template of the model within chunks ([B*S, K, N] -> same); deep-copied per layer.
    inter_model : torch.nn.Module
        Template of the model across chunks ([B*K, S, N] -> same). Must be a
        separate instance from ``intra_model``, or the two share weights.
    **kwargs
        The other arguments of ``Dual_Path_Model`` (num_layers, norm, K,
        num_spks, skip_around_intra, linear_layer_after_inter_intra).

    Example
    -------
    >>> import torch
    >>> from speechbrain_mamba.lobes import MambaStack
    >>> masknet = DualPathModel(
    ...     16, 16, MambaStack(16), MambaStack(16), num_layers=2, K=10,
    ...     linear_layer_after_inter_intra=False,
    ... )
    >>> masknet(torch.randn(1, 16, 40)).shape
    torch.Size([2, 1, 16, 40])
    """

    def __init__(self, in_channels: int, out_channels: int, intra_model: nn.Module, inter_model: nn.Module, **kwargs):
        if intra_model is inter_model:
            raise ValueError(
                "intra_model and inter_model are the same instance, so every layer's intra "
                "and inter blocks would share weights; pass two separate instances."
            )
        super().__init__(in_channels, out_channels, intra_model, inter_model, **kwargs)
        replace_single_group_norms(self)

    def _padding(self, input: torch.Tensor, K: int) -> Tuple[torch.Tensor, int]:
        """Zero-pads [B, N, L] by K // 2 on the left and K // 2 + gap on the right, as the stock method."""
        hop = K // 2
        gap = K - (hop + input.shape[-1] % K) % K
        return F.pad(input, (hop, gap + hop)), gap
