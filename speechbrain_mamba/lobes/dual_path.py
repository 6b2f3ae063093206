"""Dual-path mask networks: SpeechBrain's Dual_Path_Model with a fast norm, on-device padding
and fewer layout copies."""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from speechbrain.lobes.models.dual_path import Dual_Computation_Block, Dual_Path_Model

from speechbrain_mamba.lobes.norms import SingleGroupNorm, replace_single_group_norms


class ChannelLastDualComputationBlock(Dual_Computation_Block):
    """SpeechBrain's ``Dual_Computation_Block`` (one intra- and one inter-chunk
    layer), computing the same function with one layout copy instead of four.

    The [B, N, K, S] activations are kept as views of [B, S, K, N] storage
    (channels innermost, chunks outermost; the first layer makes its input
    so, the others get it so): the intra-chunk model reads its [B*S, K, N]
    sequences in place; only the inter-chunk model's [B*K, S, N] input is
    copied, and its output is read transposed by the norm and the residual
    sum. With ``SingleGroupNorm`` (which :class:`DualPathModel` installs) each
    norm and the residual sum after it are one pass. Same arguments and
    submodules as ``Dual_Computation_Block``.

    Arguments
    ---------
    intra_mdl, inter_mdl : torch.nn.Module
        [batch, time, N] -> same, within and across chunks.
    out_channels : int
        N.
    **kwargs
        ``norm``, ``skip_around_intra``, ``linear_layer_after_inter_intra``.

    Example
    -------
    >>> from speechbrain_mamba.lobes import MambaStack
    >>> block = ChannelLastDualComputationBlock(MambaStack(16), MambaStack(16), 16)
    >>> block = replace_single_group_norms(block)
    >>> x = torch.randn(2, 16, 10, 3)
    >>> y = block(x)
    >>> y.shape, y.permute(0, 3, 2, 1).is_contiguous()
    (torch.Size([2, 16, 10, 3]), True)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, K, S] -> [B, N, K, S] (channels-innermost storage)."""
        B, N, K, S = x.shape
        # Channels innermost ([B, S, K, N] storage): no copy when the layer before made x. The residual sums
        # return their residual's layout, so every layer's output is channels-innermost too.
        x = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
        intra = self.intra_mdl(x.permute(0, 3, 2, 1).reshape(B * S, K, N))  # a view
        if self.linear_layer_after_inter_intra:
            intra = self.intra_linear(intra)
        intra = intra.reshape(B, S, K, N).permute(0, 3, 2, 1)
        intra = _norm_and_add(self.intra_norm if self.norm is not None else None, intra,
                              x if self.skip_around_intra else None)
        inter = self.inter_mdl(intra.permute(0, 2, 3, 1).reshape(B * K, S, N))  # the one copy
        if self.linear_layer_after_inter_intra:
            inter = self.inter_linear(inter)
        inter = inter.reshape(B, K, S, N).permute(0, 3, 1, 2)
        return _norm_and_add(self.inter_norm if self.norm is not None else None, inter, intra)


def _norm_and_add(norm: Optional[nn.Module], x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``norm(x) + residual`` (either part optional), in the residual's layout; one pass for a
    ``SingleGroupNorm``."""
    if isinstance(norm, SingleGroupNorm):
        return norm(x, residual)
    if norm is not None:
        x = norm(x)
    return x if residual is None else residual + x


class DualPathModel(Dual_Path_Model):
    """SpeechBrain's ``Dual_Path_Model`` whose ``GroupNorm(1, N)`` norms are
    :class:`~speechbrain_mamba.lobes.norms.SingleGroupNorm`, whose chunk
    padding is made on the input's device (the stock one builds zeros on the
    CPU and copies them over, which also rules out capturing CUDA graphs), and
    whose dual-path layers are :class:`ChannelLastDualComputationBlock`.

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
        for layer in self.dual_mdl:
            # The same module with another forward (no state of its own), as
            # torch.nn.utils.parametrize swaps a module's class.
            layer.__class__ = ChannelLastDualComputationBlock

    def _Segmentation(self, input: torch.Tensor, K: int) -> Tuple[torch.Tensor, int]:
        """The stock chunking, [B, N, L] -> [B, N, K, S], returned channels-innermost ([B, S, K, N] storage)
        as the layers keep their activations: the first layer then reads it in place, and no copy of it in
        the stock layout stays alive through that layer."""
        chunks, gap = super()._Segmentation(input, K)
        return chunks.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1), gap

    def _padding(self, input: torch.Tensor, K: int) -> Tuple[torch.Tensor, int]:
        """Zero-pads [B, N, L] by K // 2 on the left and K // 2 + gap on the right, as the stock method."""
        hop = K // 2
        gap = K - (hop + input.shape[-1] % K) % K
        return F.pad(input, (hop, gap + hop)), gap
