"""Dynamic mixing: a fresh random mixture for every training example, every epoch.

Each item is drawn from a generator seeded by (seed, epoch, index), so that an
item is reproducible (a resumed run sees the same data), every epoch mixes
anew, and DDP ranks, which receive different indices from their sampler, see
different mixtures. Gains follow SpeechBrain's WSJ0-2mix dynamic-mixing recipe.
"""

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile
import torch
import torchaudio
from speechbrain.processing.signal_processing import rescale

from speechbrain_mamba.separation.data_prep import DataError

logger = logging.getLogger(__name__)


class DynamicMixingDataset(torch.utils.data.Dataset):
    """Random mixtures of distinct speakers, with optional speed perturbation and noise.

    Speakers are drawn with probability proportional to their number of
    utterances. Each source is speed-perturbed (resampled by a factor drawn
    from ``speeds``, in percent) before mixing, so that the mixture is rebuilt
    from the perturbed sources. Gains (dB, average level): first source
    clip(N(-27.43, 2.57), -45, 0); others the first plus N(-2.51, 2.66),
    clipped likewise; noise, if given, at the first source's level plus
    N(-2.51, 2.66). Sources are cropped at random to the shortest one (and to
    ``segment_length``), then everything is scaled so that the peak is 0.9.
    Every file's header is checked at construction (sample rate, one channel,
    not empty): bad files, or fewer speakers than ``num_spks``, raise a ``DataError`` naming them, before training.

    Arguments
    ---------
    utterances : Dict[str, List[Path]]
        Single-speaker files by speaker id (see ``data_prep.list_speaker_utterances``).
    num_spks : int
        Sources per mixture.
    num_mixtures : int
        Items per epoch.
    sample_rate : int
        Sample rate of the files and of the output.
    segment_length : int, optional
        Crop mixtures to at most this many samples (None: whole shortest utterance).
    speeds : Sequence[int]
        Speed factors in percent ([100] for none).
    noise_files : List[Path], optional
        Noise recordings mixed in at random offsets (WHAM!, noisy LibriMix).
    seed : int
        Base seed.

    Example
    -------
    >>> import tempfile, soundfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> for spk in ("aaa", "bbb", "ccc"):
    ...     soundfile.write(folder / f"{spk}01.wav", np.random.randn(4000) * 0.1, 8000)
    >>> utterances = {spk: [folder / f"{spk}01.wav"] for spk in ("aaa", "bbb", "ccc")}
    >>> dataset = DynamicMixingDataset(utterances, num_spks=2, num_mixtures=10, segment_length=2000)
    >>> item = dataset[3]
    >>> item["mixture"].shape, item["sources"].shape
    (torch.Size([2000]), torch.Size([2000, 2]))
    >>> torch.allclose(item["mixture"], item["sources"].sum(-1), atol=1e-6)
    True
    """

    def __init__(
        self,
        utterances: Dict[str, List[Path]],
        num_spks: int,
        num_mixtures: int,
        sample_rate: int = 8000,
        segment_length: Optional[int] = None,
        speeds: Sequence[int] = (100,),
        noise_files: Optional[List[Path]] = None,
        seed: int = 1234,
    ):
        if len(utterances) < num_spks:
            files = [str(path) for paths in utterances.values() for path in paths]
            folder = os.path.commonpath(files) if files else "no utterances"
            raise DataError(
                f"{folder}: dynamic mixing needs utterances of at least num_spks={num_spks} speakers; "
                f"found {len(utterances)} ({', '.join(sorted(utterances)) or 'none'})"
            )
        self.speakers = sorted(utterances)
        self.utterances = {spk: sorted(map(Path, utterances[spk])) for spk in self.speakers}
        counts = np.array([len(self.utterances[spk]) for spk in self.speakers], dtype=float)
        self.speaker_weights = counts / counts.sum()
        self.num_spks = num_spks
        self.num_mixtures = num_mixtures
        self.sample_rate = sample_rate
        self.segment_length = segment_length
        self.speeds = list(speeds)
        self.noise_files = sorted(map(Path, noise_files or []))
        self.seed = seed
        self.epoch = 0
        self._check_files()

    def _check_files(self) -> None:
        """Reads every file's header up front: a bad file is reported now, not in the middle of an epoch."""
        problems = []
        for path in [p for spk in self.speakers for p in self.utterances[spk]] + self.noise_files:
            try:
                info = soundfile.info(str(path))
            except (soundfile.SoundFileError, RuntimeError) as error:
                problems.append(f"{path}: unreadable audio ({error})")
                continue
            if info.samplerate != self.sample_rate:
                problems.append(f"{path}: sample rate {info.samplerate} Hz, expected {self.sample_rate} Hz")
            if info.channels != 1:
                problems.append(f"{path}: {info.channels} channels, expected 1 (mono)")
            if info.frames == 0:
                problems.append(f"{path}: empty audio (0 samples), expected speech")
        if problems:
            listed = "\n".join(f"  - {problem}" for problem in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"dynamic mixing: {len(problems)} bad file(s):\n{listed}{more}")

    def set_epoch(self, epoch: int) -> None:
        """Mixtures depend on the epoch: call before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_mixtures

    def _read(self, path: Path, rng: np.random.Generator) -> torch.Tensor:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
        if rate != self.sample_rate:
            raise ValueError(f"{path}: sample rate {rate} Hz, expected {self.sample_rate} Hz.")
        wave = torch.from_numpy(audio[:, 0].copy())
        speed = self.speeds[rng.integers(len(self.speeds))]
        if speed != 100:
            wave = torchaudio.functional.resample(wave, self.sample_rate * speed // 100, self.sample_rate)
        return wave

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        speakers = rng.choice(len(self.speakers), size=self.num_spks, replace=False, p=self.speaker_weights)
        waves = []
        for spk_index in speakers:
            files = self.utterances[self.speakers[spk_index]]
            waves.append(self._read(files[rng.integers(len(files))], rng))
        length = min(len(w) for w in waves)
        if self.segment_length:
            length = min(length, self.segment_length)
        sources = torch.stack([_random_crop(w, length, rng) for w in waves], dim=-1)  # [time, spks]

        first_gain = float(np.clip(rng.normal(-27.43, 2.57), -45, 0))
        gains = [first_gain] + [float(np.clip(first_gain + rng.normal(-2.51, 2.66), -45, 0))
                                for _ in range(self.num_spks - 1)]
        lengths = torch.ones(1)
        for i, gain in enumerate(gains):
            sources[:, i] = rescale(sources[:, i], lengths, gain, scale="dB").squeeze(0)
        mixture = sources.sum(-1)
        item = {"sources": sources}
        if self.noise_files:
            noise = self._noise(length, first_gain, rng)
            mixture = mixture + noise
            item["noise"] = noise

        peak = max(mixture.abs().max().item(), sources.abs().max().item(), 1e-8)
        scale = 0.9 / peak
        item = {key: value * scale for key, value in item.items()}
        item["mixture"] = mixture * scale
        item["id"] = f"dm_e{self.epoch}_{index}"
        return item

    def _noise(self, length: int, first_gain: float, rng: np.random.Generator) -> torch.Tensor:
        path = self.noise_files[rng.integers(len(self.noise_files))]
        noise = self._read(path, rng)
        if len(noise) < length:  # loop short noise recordings
            noise = noise.repeat(length // len(noise) + 1)
        noise = _random_crop(noise, length, rng)
        gain = float(np.clip(first_gain + rng.normal(-2.51, 2.66), -45, 0))
        return rescale(noise, torch.ones(1), gain, scale="dB").squeeze(0)


def _random_crop(wave: torch.Tensor, length: int, rng: np.random.Generator) -> torch.Tensor:
    start = int(rng.integers(len(wave) - length + 1))
    return wave[start : start + length]
