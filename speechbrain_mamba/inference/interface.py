"""The pretrained separation interface: ``MambaSeparator.from_hparams(source=...)``."""

import os
from typing import Union

import torch
import torchaudio
from speechbrain.inference.interfaces import Pretrained

from speechbrain_mamba.inference.audio import AudioError, check_mixture, read_mixture
from speechbrain_mamba.inference.chunking import separate_in_chunks
from speechbrain_mamba.utils.cuda_graphs import CUDAGraphCache
from speechbrain_mamba.separation.separator import separate_mixture

PathLike = Union[str, os.PathLike]
CHUNK_SECONDS = 30.0
OVERLAP_SECONDS = 4.0


class MambaSeparator(Pretrained):
    """Separates speech with a trained masking model (DPMamba, Mamba-TasNet, Sepformer, ...) or SepMamba.

    Load an inference folder written by
    :func:`~speechbrain_mamba.inference.export_model` (or any ``from_hparams``
    source whose ``hyperparams.yaml`` defines ``num_spks``, ``sample_rate`` and
    ``modules``: ``encoder``/``masknet``/``decoder`` or ``model``) with
    ``MambaSeparator.from_hparams(source=folder, run_opts={"device": "cuda",
    "precision": "bf16"})``. The forward is the training one,
    :func:`~speechbrain_mamba.separation.separator.separate_mixture`, under
    ``torch.no_grad`` and the autocast of the ``precision`` run option
    (fp32, bf16 or fp16).

    Arguments
    ---------
    See ``speechbrain.inference.interfaces.Pretrained``.

    Example
    -------
    >>> from speechbrain_mamba.lobes import SepMamba
    >>> separator = MambaSeparator(modules={"model": SepMamba(dim=4, num_layers=1)},
    ...                            hparams={"num_spks": 2, "sample_rate": 8000}, run_opts={"device": "cpu"})
    >>> separator.separate_batch(torch.randn(1, 1000)).shape
    torch.Size([1, 1000, 2])
    >>> separator.separate_signal(torch.randn(4000), sample_rate=16000, chunk_seconds=0.1, overlap_seconds=0.03).shape
    torch.Size([2000, 2])
    """

    HPARAMS_NEEDED = ["num_spks", "sample_rate"]
    cuda_graphs = None

    def use_cuda_graphs(self, max_graphs: int = 4) -> None:
        """Runs later CUDA separations through captured CUDA graphs, one per input shape.

        Worth it for short inputs, where launching kernels costs more than
        running them, and for chunked long recordings (all chunks but the last
        share a shape). The first separation of each shape is slower (warm-up
        and capture); each kept graph holds one forward's memory. See
        :class:`~speechbrain_mamba.utils.cuda_graphs.CUDAGraphCache`.

        Arguments
        ---------
        max_graphs : int
            Number of input shapes whose graphs are kept.
        """
        self.cuda_graphs = CUDAGraphCache(
            lambda mix: separate_mixture(self.mods, mix, self.hparams.num_spks), max_graphs=max_graphs
        )

    def separate_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """Separates a batch of mixtures at the model's sampling rate.

        Arguments
        ---------
        mix : torch.Tensor
            [batch, time] mixtures.

        Returns
        -------
        torch.Tensor
            [batch, time, num_spks] float32 estimates, on the model's device.
        """
        with torch.no_grad(), self.inference_ctx:
            mix = mix.to(self.device)
            if self.cuda_graphs is not None:
                return self.cuda_graphs(mix).float()
            return separate_mixture(self.mods, mix, self.hparams.num_spks).float()

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`separate_batch`."""
        return self.separate_batch(mix)

    def separate_signal(
        self,
        mixture: torch.Tensor,
        sample_rate: int,
        chunk_seconds: float = CHUNK_SECONDS,
        overlap_seconds: float = OVERLAP_SECONDS,
    ) -> torch.Tensor:
        """Separates one recording of any length and sampling rate.

        The mixture is checked (:func:`~speechbrain_mamba.inference.check_mixture`),
        resampled to the model's rate and separated in overlapping chunks
        (:func:`~speechbrain_mamba.inference.separate_in_chunks`), so that
        memory does not grow with the length beyond the signals themselves.

        Arguments
        ---------
        mixture : torch.Tensor
            [time] mono waveform; a single channel as [1, time] (what
            ``torchaudio.load`` returns) or [time, 1] is taken as [time]. Several
            channels are refused, as a tensor does not tell [channels, time]
            from [time, channels]: downmix them first, e.g. ``waveform.mean(dim=0)``
            for torchaudio's layout (:meth:`separate_file` downmixes files, as
            :func:`~speechbrain_mamba.inference.read_mixture` does).
        sample_rate : int
            Its sampling rate in Hz.
        chunk_seconds : float
            Chunk length (0: the whole recording at once).
        overlap_seconds : float
            Overlap of consecutive chunks, where the speaker order is matched
            and the chunks cross-faded; at most half a chunk.

        Returns
        -------
        torch.Tensor
            [time, num_spks] float32 estimates on the CPU, at the model's
            sampling rate (``self.hparams.sample_rate``).

        Raises
        ------
        AudioError
            For a tensor that is not one channel, or that
            :func:`~speechbrain_mamba.inference.check_mixture` refuses.
        """
        if mixture.dim() == 2 and 1 in mixture.shape:
            mixture = mixture.reshape(-1)
        if mixture.dim() != 1:
            raise AudioError(
                f"mixture of shape {list(mixture.shape)}: one channel of shape [time] was expected (or [1, time]); "
                "downmix several channels first, e.g. waveform.mean(dim=0) for [channels, time]"
            )
        check_mixture(mixture, sample_rate)
        model_rate = self.hparams.sample_rate
        mixture = torchaudio.functional.resample(mixture.float().cpu(), sample_rate, model_rate)
        return separate_in_chunks(
            lambda chunk: self.separate_batch(chunk[None])[0].cpu(),
            mixture,
            chunk_length=round(chunk_seconds * model_rate),
            overlap=round(overlap_seconds * model_rate),
        )

    def separate_file(
        self, path: PathLike, chunk_seconds: float = CHUNK_SECONDS, overlap_seconds: float = OVERLAP_SECONDS
    ) -> torch.Tensor:
        """Separates an audio file (any format libsndfile reads, any rate, channels downmixed).

        Arguments
        ---------
        path : str or os.PathLike
            The mixture file (read by :func:`~speechbrain_mamba.inference.read_mixture`).
        chunk_seconds, overlap_seconds : float
            See :meth:`separate_signal`.

        Returns
        -------
        torch.Tensor
            [time, num_spks] estimates at the model's sampling rate.
        """
        mixture, sample_rate = read_mixture(path)
        return self.separate_signal(mixture, sample_rate, chunk_seconds, overlap_seconds)
