"""Small speech-separation datasets built from the synthetic speech corpus that ships with the package.

``speechbrain_mamba/data/demo_speech`` holds 8 kHz single-speaker utterances of about 14 synthetic voices
(flite and espeak-ng reading public-domain text; see its README.md for provenance and licences).
:func:`build_demo_dataset` mixes them into a dataset laid out exactly like WSJ0-2mix/3mix, Libri2Mix/3Mix
or WHAM!, plus a folder of single-speaker training utterances laid out like WSJ0 or LibriSpeech for
dynamic mixing, so that the recipes, tests and tutorials run end to end without a licensed corpus.
Models trained on it learn nothing about real speech; it exercises the pipeline, nothing more.
"""

import json
import os
import shutil
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import soundfile as sf

PathLike = Union[str, os.PathLike]

DEMO_SPEECH_DIR: Path = Path(__file__).resolve().parents[1] / "data" / "demo_speech"
SAMPLE_RATE = 8000
LAYOUTS = ("wsj0mix", "librimix", "wham")
# Split folder names (train, valid, test) of each corpus.
SPLITS = {"wsj0mix": ("tr", "cv", "tt"), "librimix": ("train-360", "dev", "test"), "wham": ("tr", "cv", "tt")}
MIX_PEAK = 0.9  # peak of the loudest signal written (mixture, source or noise): headroom for int16 rounding
MAX_RELATIVE_GAIN_DB = 2.5  # gain of each source relative to the first, uniform in +-this
NOISE_SNR_DB = (0.0, 6.0)  # the noise lies this many dB below the speech mixture (uniform)
HELDOUT_FRACTION = 0.15  # of each speaker's utterances, for validation and again for test
LIBRI_FIRST_SPEAKER = 1001  # numeric LibriSpeech-style ids replace the 3-character ids
LIBRI_CHAPTER = 1  # one chapter per speaker
_MARKER = ".demo_dataset.json"
_FORMAT = 1  # bump when the generated content changes, so that old builds are redone


@dataclass(frozen=True)
class DemoDataset:
    """Where a demo dataset was built.

    Arguments
    ---------
    data_folder : Path
        The corpus root to pass as the recipe's ``data_folder`` (``wsj0-mix``, ``Libri2Mix``/``Libri3Mix``
        or ``wham``).
    dm_folder : Path
        Single-speaker training utterances for dynamic mixing, laid out like the real corpus
        (``wsj0/si_tr_s/<spk>/<utt>.wav`` or ``LibriSpeech/train-clean-360/<spk>/<chapter>/<utt>.flac``).

    Example
    -------
    >>> demo = DemoDataset(Path("/data/wsj0-mix"), Path("/data/wsj0/si_tr_s"))
    >>> demo.data_folder.name, demo.dm_folder.name
    ('wsj0-mix', 'si_tr_s')
    """

    data_folder: Path
    dm_folder: Path


def demo_speakers() -> Dict[str, List[Path]]:
    """The shipped demo utterances by speaker.

    Returns
    -------
    dict
        Speaker id (3 characters, the first 3 of the file name) -> sorted FLAC paths, speakers sorted.

    Example
    -------
    >>> speakers = demo_speakers()
    >>> len(speakers) >= 12, all(len(spk) == 3 for spk in speakers)
    (True, True)
    """
    speakers: Dict[str, List[Path]] = {}
    for path in sorted(DEMO_SPEECH_DIR.glob("*/*.flac")):
        speakers.setdefault(path.stem[:3], []).append(path)
    if not speakers:
        raise FileNotFoundError(
            f"{DEMO_SPEECH_DIR}: no demo utterances (<spk>/<spk><nnn>.flac); the package data is missing, "
            "reinstall the package or run tools/make_demo_corpus.py"
        )
    return speakers


def _split_utterances(speakers: Dict[str, List[Path]]) -> List[Dict[str, List[Path]]]:
    """Train/valid/test utterances per speaker: disjoint, and independent of the seed, so that the
    dynamic-mixing folder is the same for every build and can be shared by layouts."""
    splits: List[Dict[str, List[Path]]] = [{}, {}, {}]
    for spk, paths in speakers.items():
        held = max(1, round(HELDOUT_FRACTION * len(paths)))
        if len(paths) < 2 * held + 1:
            raise ValueError(f"speaker {spk} has {len(paths)} utterances, at least {2 * held + 1} are needed")
        splits[0][spk] = paths[: -2 * held]
        splits[1][spk] = paths[-2 * held : -held]
        splits[2][spk] = paths[-held:]
    return splits


def _read_int16(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="int16")[0]


def _coloured_noise(rng: np.random.Generator, length: int) -> np.ndarray:
    """Noise between pink (1/f) and brown (1/f^2) with a slow amplitude modulation, a stand-in for the
    non-stationary background noise of WHAM!."""
    exponent = rng.uniform(1.0, 2.0)
    freqs = np.fft.rfftfreq(length, 1.0 / SAMPLE_RATE)
    # Nothing below 20 Hz: brown noise would otherwise be mostly inaudible drift (the maximum avoids 0 ** -x).
    shape = np.where(freqs >= 20.0, np.maximum(freqs, 20.0) ** (-exponent / 2), 0.0)
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(length)) * shape, n=length)
    t = np.arange(length) / SAMPLE_RATE
    modulation = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
    return noise * modulation


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) + 1e-12


def _mix(
    sources: Sequence[np.ndarray], gains_db: np.ndarray, rng: np.random.Generator, with_noise: bool
) -> Tuple[List[np.ndarray], np.ndarray]:
    """Crops the sources to the shortest ("min"), levels and scales them; returns int16 sources and noise
    (empty when without noise). Mixtures are then exact integer sums, so nothing is lost to rounding."""
    length = min(len(s) for s in sources)
    cropped = [s[:length].astype(np.float64) for s in sources]
    scaled = [s / _rms(s) * 10 ** (g / 20) for s, g in zip(cropped, gains_db)]
    clean = np.sum(scaled, axis=0)
    noise = np.zeros(0)
    # The peak of everything written: a source can exceed the mixture where the sources cancel, and int16 wraps.
    peak = max(np.abs(signal).max() for signal in [clean, *scaled])
    if with_noise:
        noise = _coloured_noise(rng, length)
        noise *= _rms(clean) / _rms(noise) * 10 ** (-rng.uniform(*NOISE_SNR_DB) / 20)
        peak = max(peak, np.abs(noise).max(), np.abs(clean + noise).max())
    factor = MIX_PEAK * 32768 / peak
    return [np.round(s * factor).astype(np.int16) for s in scaled], np.round(noise * factor).astype(np.int16)


def _write(path: Path, samples: np.ndarray) -> None:
    """16-bit mono WAV. The wave module, because soundfile fsyncs every file it closes, which makes up most
    of the build time with about a thousand small files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.astype("<i2").tobytes())


def _dm_folder(output_folder: Path, layout: str) -> Path:
    if layout == "librimix":
        return output_folder / "LibriSpeech" / "train-clean-360"
    return output_folder / "wsj0" / "si_tr_s"


def _libri_stem(path: Path, libri_ids: Dict[str, int]) -> str:
    """LibriSpeech-style ``<spk>-<chapter>-<utt>`` of a demo utterance ``<spk><nnn>``."""
    return f"{libri_ids[path.stem[:3]]}-{LIBRI_CHAPTER}-{int(path.stem[3:]):04d}"


def _write_dm_folder(
    dm_folder: Path, layout: str, train: Dict[str, List[Path]], audio: Dict[Path, np.ndarray], libri_ids: Dict[str, int]
) -> None:
    """The training utterances in the layout of the corpus that dynamic mixing reads."""
    for spk, paths in train.items():
        for path in paths:
            if layout == "librimix":
                target = dm_folder / str(libri_ids[spk]) / str(LIBRI_CHAPTER) / f"{_libri_stem(path, libri_ids)}.flac"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # already 8 kHz FLAC, as LibriSpeech is FLAC
            else:
                _write(dm_folder / spk / f"{path.stem}.wav", audio[path])


def build_demo_dataset(
    output_folder: PathLike,
    layout: str = "wsj0mix",
    num_spks: int = 2,
    seed: int = 1234,
    num_mixtures: Tuple[int, int, int] = (160, 20, 20),
) -> DemoDataset:
    """Builds a small mixture dataset from the shipped demo speech, in the layout of a real corpus.

    Layouts (8 kHz, 16-bit WAV, "min" version: sources cropped to the shortest utterance):

    * ``"wsj0mix"``: ``<output_folder>/wsj0-mix/{num_spks}speakers/wav8k/min/{tr,cv,tt}/{mix,s1,s2[,s3]}``,
      mixtures named ``<utt1>_<gain1>_<utt2>_<gain2>[...].wav`` as in WSJ0-2mix.
    * ``"librimix"``: ``<output_folder>/Libri{num_spks}Mix/wav8k/min/{train-360,dev,test}/``
      ``{mix_clean,mix_both,s1,s2[,s3],noise}``, mixtures named ``<spk>-<chapter>-<utt>_<...>.wav``.
    * ``"wham"``: ``<output_folder>/wham/wav8k/min/{tr,cv,tt}/{mix_clean,mix_both,s1,s2,noise}`` (2 speakers).

    Each mixture has distinct speakers; each source is levelled to the same RMS, then gets a gain (dB)
    relative to the first source drawn uniformly in [-2.5, 2.5]; the sum is scaled to a peak of 0.9, the
    sources by the same factor, so that ``mix`` (``mix_clean``) is exactly the sum of the written sources.
    With noise (LibriMix, WHAM!), the noise is synthetic coloured noise with a slow amplitude modulation,
    0-6 dB below the speech mixture, and ``mix_both == mix_clean + noise`` exactly.
    Each utterance belongs to one split only (a fixed share of every speaker: the splits share voices but
    no utterance, unlike the real corpora, which have disjoint speakers). The training-split utterances
    also go, for dynamic mixing, to ``<output_folder>/wsj0/si_tr_s/<spk>/<utt>.wav`` (wsj0mix, wham) or
    ``<output_folder>/LibriSpeech/train-clean-360/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` (librimix,
    numeric speaker ids from 1001).

    A build that is already complete with the same arguments is returned as is; one made with other
    arguments, or interrupted, is rebuilt. Split folders that this function did not create are never
    overwritten.

    Arguments
    ---------
    output_folder : str or Path
        Folder to build in; created if needed. Several layouts can share it.
    layout : str
        "wsj0mix", "librimix" or "wham".
    num_spks : int
        Speakers per mixture, 2 or 3 (WHAM!: 2).
    seed : int
        Seed of the mixing (speakers, utterances, gains, noise).
    num_mixtures : tuple of int
        Number of mixtures in the train, valid and test splits.

    Returns
    -------
    DemoDataset
        ``data_folder`` (the recipe's data_folder) and ``dm_folder`` (utterances for dynamic mixing).

    Example
    -------
    >>> import shutil, tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> demo = build_demo_dataset(root, num_mixtures=(4, 2, 2))
    >>> split = demo.data_folder / "2speakers" / "wav8k" / "min" / "tt"
    >>> sorted(sub.name for sub in split.iterdir()), len(list((split / "mix").glob("*.wav")))
    (['mix', 's1', 's2'], 2)
    >>> demo.dm_folder.relative_to(root).as_posix()
    'wsj0/si_tr_s'
    >>> shutil.rmtree(root)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if num_spks not in (2, 3) or (layout == "wham" and num_spks != 2):
        raise ValueError(f"num_spks={num_spks} is not available for {layout} (wsj0mix, librimix: 2 or 3; wham: 2)")
    if len(num_mixtures) != 3 or any(int(n) < 1 for n in num_mixtures):
        raise ValueError(f"num_mixtures={num_mixtures!r}; expected 3 positive counts (train, valid, test)")

    output_folder = Path(output_folder).resolve()
    if layout == "wsj0mix":
        data_folder = output_folder / "wsj0-mix"
        min_root = data_folder / f"{num_spks}speakers" / "wav8k" / "min"
    else:
        data_folder = output_folder / ("wham" if layout == "wham" else f"Libri{num_spks}Mix")
        min_root = data_folder / "wav8k" / "min"
    result = DemoDataset(data_folder=data_folder, dm_folder=_dm_folder(output_folder, layout))

    counts = [int(n) for n in num_mixtures]
    settings = {"format": _FORMAT, "layout": layout, "num_spks": num_spks, "seed": seed, "num_mixtures": counts}
    marker = min_root / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == {**settings, "complete": True}:
                return result
        except ValueError:  # a marker cut short by an interrupted write: rebuild
            pass
        for split in SPLITS[layout]:
            shutil.rmtree(min_root / split, ignore_errors=True)
    elif any((min_root / split).exists() for split in SPLITS[layout]):
        raise FileExistsError(f"{min_root}: holds split folders not made by build_demo_dataset; not overwriting")
    min_root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**settings, "complete": False}))

    speakers = demo_speakers()
    libri_ids = {spk: LIBRI_FIRST_SPEAKER + i for i, spk in enumerate(speakers)}
    splits = _split_utterances(speakers)
    audio = {path: _read_int16(path) for paths in speakers.values() for path in paths}
    _write_dm_folder(result.dm_folder, layout, splits[0], audio, libri_ids)

    with_noise = layout != "wsj0mix"
    mix_dir = "mix_clean" if with_noise else "mix"
    for index, (split, utterances, count) in enumerate(zip(SPLITS[layout], splits, counts)):
        rng = np.random.default_rng([seed, index])
        spks = sorted(utterances)
        names = set()
        attempts = 0
        while len(names) < count:
            attempts += 1
            if attempts > 100 * count:  # only when asking for more mixtures than there are combinations
                raise ValueError(f"{split}: could not draw {count} distinct mixtures from the demo utterances")
            chosen = [utterances[spk][rng.integers(len(utterances[spk]))] for spk in rng.choice(spks, num_spks, False)]
            gains = np.concatenate([[0.0], rng.uniform(-MAX_RELATIVE_GAIN_DB, MAX_RELATIVE_GAIN_DB, num_spks - 1)])
            gains -= gains.mean()  # centred, like the +g/-g gains in WSJ0-2mix names
            if layout == "librimix":
                name = "_".join(_libri_stem(p, libri_ids) for p in chosen)
            else:
                name = "_".join(f"{p.stem}_{g:.4f}" for p, g in zip(chosen, gains))
            if name in names:  # the same utterances again (LibriMix names carry no gains): draw anew
                continue
            names.add(name)
            sources, noise = _mix([audio[p] for p in chosen], gains, rng, with_noise)
            clean = np.sum(sources, axis=0, dtype=np.int32)
            _write(min_root / split / mix_dir / f"{name}.wav", clean.astype(np.int16))
            for k, source in enumerate(sources, start=1):
                _write(min_root / split / f"s{k}" / f"{name}.wav", source)
            if with_noise:
                _write(min_root / split / "noise" / f"{name}.wav", noise)
                _write(min_root / split / "mix_both" / f"{name}.wav", (clean + noise).astype(np.int16))
    marker.write_text(json.dumps({**settings, "complete": True}))
    return result
