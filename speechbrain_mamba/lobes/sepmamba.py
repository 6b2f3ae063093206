"""SepMamba (Avenstrup et al., 2024): a waveform U-Net of bidirectional Mamba stages."""

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from speechbrain_mamba.lobes.mamba import MambaStack


class BidirectionalMambaStack(nn.Module):
    """SepMamba's sequence model: a causal Mamba stack plus a separate anti-causal one, summed.

    Unlike BiMamba (v2), the two directions share nothing: each is a stack of
    ``num_layers`` pre-norm (LayerNorm) Mamba blocks with residuals and no final
    norm. The backward stack scans from the last frame to the first instead of
    running on a flipped copy. ``causal=True`` keeps only a forward stack of
    ``2 * num_layers`` blocks (same parameter count).

    Arguments
    ---------
    d_model : int
        Feature size.
    num_layers : int
        Blocks per direction.
    causal : bool
        Forward direction only, with twice the blocks.
    **mixer_kwargs
        Passed to both :class:`MambaStack` s: their training-memory options
        (``recompute_projections``, ``checkpoint_blocks``) and the mixers'
        (``d_state``, ``d_conv``, ``expand``, ``scan_backend``).

    Example
    -------
    >>> stack = BidirectionalMambaStack(16, num_layers=2)
    >>> stack(torch.randn(3, 40, 16)).shape
    torch.Size([3, 40, 16])
    """

    def __init__(self, d_model: int, num_layers: int, causal: bool = False, **mixer_kwargs):
        super().__init__()
        stack = dict(bidirectional=False, norm="layernorm", final_norm=False, **mixer_kwargs)
        self.forward_stack = MambaStack(d_model, 2 * num_layers if causal else num_layers, **stack)
        self.backward_stack = None if causal else MambaStack(d_model, num_layers, reverse=True, **stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, time, d_model] -> [batch, time, d_model]."""
        out = self.forward_stack(x)
        return out if self.backward_stack is None else out + self.backward_stack(x)


class SepMamba(nn.Module):
    """Waveform U-Net: strided conv down stages, transposed-conv up stages with skips, Mamba at every stage.

    Three down stages (Conv1d, kernel 16, stride 2, no padding, ReLU) to
    ``dim``, ``2 dim``, ``4 dim`` channels, each followed by a
    :class:`BidirectionalMambaStack`; two up stages (ConvTranspose1d + ReLU,
    padded to the skip's length, concatenated with it, 1x1 Conv + ReLU back to
    the stage's channels, then a Mamba stack); a last ConvTranspose1d to
    ``num_spks`` waveforms, cropped or padded to the input length. No mask and
    no output activation.

    Causality: with ``causal=True`` every Mamba layer is causal, but the
    unpadded strided convolutions are not. Output sample ``t`` depends on input
    samples up to ``t + lookahead`` with ``lookahead = (k - 1)(1 + s + s^2)``:
    a frame ``i`` of the third (deepest) down stage covers input samples up to
    ``8 i + 105``, and the transposed convolutions map output sample ``t`` to
    that stage's frame ``floor(t / 8)`` (the skips reach less far ahead). With
    ``k = 16, s = 2`` that is 105 samples, 13.125 ms at 8 kHz, reached for
    every ``t`` divisible by 8 (the bound is tight; see ``tests/test_sepmamba.py``).
    :class:`speechbrain_mamba.lobes.streaming.SepMambaStreamer` runs the causal
    model chunk by chunk.

    Arguments
    ---------
    dim : int
        Channels of the first stage (S: 64, M: 128).
    num_layers : int
        Mamba blocks per direction per stage (S: 4, M: 3).
    num_spks : int
        Number of output waveforms.
    causal : bool
        Forward-only Mamba stacks with twice the blocks (parameter-matched).
    kernel_size, stride : int
        Of every (transposed) convolution.
    **mixer_kwargs
        Passed to every :class:`BidirectionalMambaStack` (e.g.
        ``recompute_projections=True``: less training memory, same gradients).

    Example
    -------
    >>> model = SepMamba(dim=8, num_layers=1)
    >>> model(torch.randn(2, 1000)).shape
    torch.Size([2, 1000, 2])
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_spks: int = 2,
        causal: bool = False,
        kernel_size: int = 16,
        stride: int = 2,
        **mixer_kwargs,
    ):
        super().__init__()
        self.num_spks = num_spks
        self.causal = causal
        self.kernel_size, self.stride = kernel_size, stride
        widths = [1, dim, 2 * dim, 4 * dim]

        def mamba(channels):
            return BidirectionalMambaStack(channels, num_layers, causal=causal, **mixer_kwargs)

        self.down = nn.ModuleList(
            nn.ModuleDict({"conv": nn.Conv1d(c_in, c_out, kernel_size, stride), "mamba": mamba(c_out)})
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.up = nn.ModuleList(
            nn.ModuleDict(
                {
                    "deconv": nn.ConvTranspose1d(c_in, c_out, kernel_size, stride),
                    "fuse": nn.Conv1d(2 * c_out, c_out, 1),
                    "mamba": mamba(c_out),
                }
            )
            for c_in, c_out in [(4 * dim, 2 * dim), (2 * dim, dim)]
        )
        self.output = nn.ConvTranspose1d(dim, num_spks, kernel_size, stride)

    @property
    def min_length(self) -> int:
        """Shortest input (samples) for which the deepest stage still has one frame."""
        length = 1
        for _ in self.down:
            length = (length - 1) * self.stride + self.kernel_size
        return length

    @property
    def lookahead(self) -> int:
        """Input samples past ``t`` that output sample ``t`` depends on (causal variant; 105 by default).

        ``(kernel_size - 1) * (1 + stride + ... + stride^(stages - 1))``: what
        the down stages' windows reach past their first sample, in input
        samples. The bidirectional model sees the whole input regardless.
        """
        return sum((self.kernel_size - 1) * self.stride**level for level in range(len(self.down)))

    @staticmethod
    def _run_mamba(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return stack(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """Mixture [batch, time] or [batch, 1, time] -> sources [batch, time, num_spks]."""
        if mixture.dim() == 3 and mixture.shape[1] == 1:
            mixture = mixture.squeeze(1)
        if mixture.dim() != 2:
            raise ValueError(f"SepMamba expects [batch, time] or [batch, 1, time]; got {tuple(mixture.shape)}.")
        length = mixture.shape[-1]
        if length < self.min_length:
            raise ValueError(f"SepMamba needs at least {self.min_length} samples; got {length}.")

        x = mixture.unsqueeze(1)
        skips: List[torch.Tensor] = []  # the down stages' outputs but the deepest, each freed once used
        for stage in self.down:
            x = self._run_mamba(stage["mamba"], F.relu(stage["conv"](x)))
            skips.append(x)
        skips.pop()
        for stage in self.up:
            skip = skips.pop()
            x = _fit_length(F.relu(stage["deconv"](x)), skip.shape[-1])
            x = F.relu(stage["fuse"](torch.cat([x, skip], dim=1)))
            del skip  # its memory is free for the stage's Mamba stack
            x = self._run_mamba(stage["mamba"], x)
        sources = _fit_length(self.output(x), length)
        return sources.transpose(1, 2)


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Crops or zero-pads the last dimension to ``length``."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return F.pad(x, (0, length - x.shape[-1]))
