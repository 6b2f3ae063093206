"""Mamba-TasNet's single-path mask network (Jiang, Han, Mesgarani, "Speech Slytherin")."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from speechbrain_mamba.lobes.mamba import MambaStack


class MambaTasNetMaskNet(nn.Module):
    """Layer norm, bottleneck, Mamba stack over the whole sequence, one mask per speaker.

    Works channels-last: the 1x1 convolutions of the paper are the equivalent
    ``nn.Linear`` layers (same parameter count), which spares two transposes.

    Arguments
    ---------
    channels : int
        Channels N of the encoder output.
    num_layers : int
        Mamba blocks in the stack.
    num_spks : int
        Number of masks.
    bidirectional : bool
        BiMamba blocks (True) or causal Mamba blocks.
    norm_eps : float
        Epsilon of the input LayerNorm; 1e-8 as in the released Mamba-TasNet
        models, so that their checkpoints reproduce their outputs.
    **mixer_kwargs
        Passed to the Mamba stack.

    Example
    -------
    >>> masknet = MambaTasNetMaskNet(16, num_layers=2)
    >>> masknet(torch.randn(3, 16, 40)).shape
    torch.Size([2, 3, 16, 40])
    """

    def __init__(
        self,
        channels: int,
        num_layers: int,
        num_spks: int = 2,
        bidirectional: bool = True,
        norm_eps: float = 1e-8,
        **mixer_kwargs,
    ):
        super().__init__()
        self.num_spks = num_spks
        self.norm = nn.LayerNorm(channels, eps=norm_eps)
        self.bottleneck = nn.Linear(channels, channels, bias=False)
        self.mamba = MambaStack(channels, num_layers, bidirectional=bidirectional, **mixer_kwargs)
        self.mask_proj = nn.Linear(channels, num_spks * channels, bias=False)

    def forward(self, mixture_w: torch.Tensor) -> torch.Tensor:
        """Encoded mixture [B, N, L] -> masks [num_spks, B, N, L]."""
        batch, channels, length = mixture_w.shape
        x = self.bottleneck(self.norm(mixture_w.transpose(1, 2)))
        masks = F.relu(self.mask_proj(self.mamba(x)))  # [B, L, spks * N]
        return masks.view(batch, length, self.num_spks, channels).permute(2, 0, 3, 1)
