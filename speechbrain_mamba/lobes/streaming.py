"""Chunk-by-chunk inference of the causal SepMamba, with carried state.

Every stage of the U-Net keeps what the next chunk needs:

* strided convolutions (no padding): the input samples of windows not yet complete;
* Mamba stacks: each block's convolution and SSM state (:meth:`MambaStack.step`);
* transposed convolutions: the ``kernel_size - stride`` output samples that the
  next frames still add to (overlap-add);
* up stages: the skip frames not yet matched by an upsampled frame (the deeper
  path lags behind the skip).

Concatenated, the chunk outputs and the final :meth:`SepMambaStreamer.flush`
equal the offline ``SepMamba`` output on the whole signal (up to float rounding).
"""

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from speechbrain_mamba.lobes.mamba import MambaState
from speechbrain_mamba.lobes.sepmamba import BidirectionalMambaStack, SepMamba, _fit_length


def _empty(like: torch.Tensor, channels: int) -> torch.Tensor:
    return like.new_zeros(like.shape[0], channels, 0)


class _StridedConv:
    """An unpadded strided Conv1d fed chunk by chunk: keeps the samples of incomplete windows."""

    def __init__(self, conv: nn.Conv1d):
        self.conv = conv
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        self.buffer: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, L] -> [B, C_out, frames completed by these samples]."""
        buffer = x if self.buffer is None else torch.cat([self.buffer, x], dim=-1)
        frames = max(0, (buffer.shape[-1] - self.kernel) // self.stride + 1)
        self.buffer = buffer[..., frames * self.stride :]
        if frames == 0:
            return _empty(x, self.conv.out_channels)
        return self.conv(buffer[..., : (frames - 1) * self.stride + self.kernel])


class _OverlapAdd:
    """A ConvTranspose1d fed chunk by chunk: keeps the tail that later frames still add to."""

    def __init__(self, deconv: nn.ConvTranspose1d):
        self.deconv = deconv
        self.stride = deconv.stride[0]
        self.tail: Optional[torch.Tensor] = None

    def _with_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.deconv.bias is None else y + self.deconv.bias[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, n] -> the n * stride output samples that no later frame changes."""
        if x.shape[-1] == 0:
            return _empty(x, self.deconv.out_channels)
        y = F.conv_transpose1d(x, self.deconv.weight, stride=self.stride)
        if self.tail is not None:
            y[..., : self.tail.shape[-1]] += self.tail
        ready = x.shape[-1] * self.stride
        self.tail = y[..., ready:]
        return self._with_bias(y[..., :ready])

    def flush(self) -> torch.Tensor:
        """The last ``kernel_size - stride`` samples, once no frame follows."""
        return self._with_bias(self.tail)


class _CausalStack:
    """A causal BidirectionalMambaStack (forward stack only) with its blocks' states."""

    def __init__(self, stack: BidirectionalMambaStack):
        self.stack = stack.forward_stack
        self.states: Optional[List[MambaState]] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, n] -> [B, C, n]."""
        if x.shape[-1] == 0:
            return x
        y, self.states = self.stack.step(x.transpose(1, 2), self.states)
        return y.transpose(1, 2)


class _UpStage:
    """Transposed conv, ReLU, concatenation with the skip, 1x1 conv, ReLU, Mamba: frames as both inputs allow."""

    def __init__(self, stage: nn.ModuleDict):
        self.deconv = _OverlapAdd(stage["deconv"])
        self.fuse = stage["fuse"]
        self.mamba = _CausalStack(stage["mamba"])
        self.upsampled: Optional[torch.Tensor] = None
        self.skip: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, skip: torch.Tensor, final: bool) -> torch.Tensor:
        up = self.deconv(x)
        if final:
            up = torch.cat([up, self.deconv.flush()], dim=-1)
        up = F.relu(up)
        self.upsampled = up if self.upsampled is None else torch.cat([self.upsampled, up], dim=-1)
        self.skip = skip if self.skip is None else torch.cat([self.skip, skip], dim=-1)
        if final:  # as offline: the upsampled signal cropped or zero-padded to the skip's length
            self.upsampled = _fit_length(self.upsampled, self.skip.shape[-1])
        frames = min(self.upsampled.shape[-1], self.skip.shape[-1])
        if frames == 0:
            return _empty(skip, self.fuse.out_channels)
        fused = torch.cat([self.upsampled[..., :frames], self.skip[..., :frames]], dim=1)
        self.upsampled, self.skip = self.upsampled[..., frames:], self.skip[..., frames:]
        return self.mamba(F.relu(self.fuse(fused)))


class SepMambaStreamer:
    """Streams a causal :class:`SepMamba`: audio in chunks of any length, separated audio out as it is final.

    Each call takes the next chunk and returns the output samples that no
    later input can change: after ``R`` input samples, the outputs up to about
    ``R - model.lookahead`` (emitted in blocks of 8 samples, the stride
    product). :meth:`flush` ends the stream and returns the rest. All the
    outputs of one stream, concatenated, are the offline ``model(signal)``
    (up to float rounding), whatever the chunk sizes. Runs without gradients;
    the model is used as it is (call ``model.eval()`` as for offline use).

    Arguments
    ---------
    model : SepMamba
        A causal model (``causal=True``).

    Example
    -------
    >>> model = SepMamba(dim=8, num_layers=1, causal=True).eval()
    >>> streamer = SepMambaStreamer(model)
    >>> mixture = torch.randn(1, 1000)
    >>> chunks = [streamer(chunk) for chunk in mixture.split(160, dim=-1)]
    >>> [chunk.shape[1] for chunk in chunks]
    [56, 160, 160, 160, 160, 160, 40]
    >>> streamed = torch.cat(chunks + [streamer.flush()], dim=1)
    >>> streamed.shape
    torch.Size([1, 1000, 2])
    >>> torch.allclose(streamed, model(mixture), atol=1e-5)
    True
    """

    def __init__(self, model: SepMamba):
        if not model.causal:
            raise ValueError("SepMambaStreamer needs a causal SepMamba (causal=True).")
        self.model = model
        self.reset()

    @property
    def lookahead(self) -> int:
        """The model's algorithmic look-ahead in samples (see :attr:`SepMamba.lookahead`)."""
        return self.model.lookahead

    def reset(self) -> None:
        """Forgets the stream: the next call starts a new signal."""
        self.down = [(_StridedConv(stage["conv"]), _CausalStack(stage["mamba"])) for stage in self.model.down]
        self.up = [_UpStage(stage) for stage in self.model.up]
        self.output = _OverlapAdd(self.model.output)
        self.received = self.emitted = 0
        self.batch_size: Optional[int] = None

    @torch.no_grad()
    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """The next chunk [batch, L] or [batch, 1, L] (L >= 0) -> the outputs now final [batch, n, num_spks]."""
        return self._process(chunk, final=False)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Ends the stream: the remaining outputs [batch, n, num_spks]; then :meth:`reset`."""
        if self.batch_size is None or self.received < self.model.min_length:
            raise ValueError(
                f"SepMamba needs at least {self.model.min_length} samples; the stream had {self.received}."
            )
        out = self._process(self.down[0][0].buffer.new_zeros(self.batch_size, 0), final=True)
        self.reset()
        return out

    def _process(self, chunk: torch.Tensor, final: bool) -> torch.Tensor:
        if chunk.dim() == 3 and chunk.shape[1] == 1:
            chunk = chunk.squeeze(1)
        if chunk.dim() != 2:
            raise ValueError(f"Chunks must be [batch, time] or [batch, 1, time]; got {tuple(chunk.shape)}.")
        if self.batch_size not in (None, chunk.shape[0]):
            raise ValueError(f"The stream has batch size {self.batch_size}; got a chunk of {chunk.shape[0]}.")
        self.batch_size = chunk.shape[0]
        self.received += chunk.shape[-1]

        x = chunk.unsqueeze(1)
        skips = []
        for conv, mamba in self.down:
            x = mamba(F.relu(conv(x)))
            skips.append(x)
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            x = stage(x, skip, final)
        out = self.output(x)
        if final:  # as offline: cropped or zero-padded to the input's length
            out = _fit_length(torch.cat([out, self.output.flush()], dim=-1), self.received - self.emitted)
        self.emitted += out.shape[-1]
        return out.transpose(1, 2)
