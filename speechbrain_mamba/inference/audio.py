"""Reading mixtures with clear errors, and writing separated sources all at once or not at all."""

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence, Tuple, Union

import soundfile as sf
import torch

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
MIN_SECONDS = 0.1  # shorter inputs are refused: nothing to separate
SILENCE_PEAK = 1e-4  # -80 dBFS: quieter inputs are refused as silent


class AudioError(ValueError):
    """An input that cannot be separated; the message names the file and what was expected."""


def umasked(mode: int) -> int:
    """``mode`` less the process's umask: the mode ``open`` or ``mkdir`` would give a new file or folder.

    ``tempfile.mkstemp``/``mkdtemp`` make owner-only files and folders; what they
    stage is given this mode before it is renamed into place, so that outputs are
    as readable as any other file the process writes.

    Arguments
    ---------
    mode : int
        ``0o666`` for a file, ``0o777`` for a folder.

    Returns
    -------
    int
        The mode with the umask's bits cleared.

    Example
    -------
    >>> previous = os.umask(0o027)
    >>> oct(umasked(0o666)), oct(umasked(0o777))
    ('0o640', '0o750')
    >>> _ = os.umask(previous)
    """
    umask = os.umask(0)  # the only way to read it: set it and put it back at once
    os.umask(umask)
    return mode & ~umask


def check_mixture(mixture: torch.Tensor, sample_rate: int, name: str = "mixture") -> None:
    """Refuses what cannot be separated: non-finite samples, too short, silent.

    Arguments
    ---------
    mixture : torch.Tensor
        [time] mono waveform.
    sample_rate : int
        Its sampling rate in Hz.
    name : str
        What to call it in the message (the file name).

    Raises
    ------
    AudioError
        Naming ``name`` and what was expected.

    Example
    -------
    >>> check_mixture(torch.randn(8000), 8000)
    >>> check_mixture(torch.zeros(8000), 8000, "a.wav")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    speechbrain_mamba.inference.audio.AudioError: a.wav: silent (peak amplitude 0, below 1e-04); a recording ...
    """
    nonfinite = int((~torch.isfinite(mixture)).sum())
    if nonfinite:
        raise AudioError(
            f"{name}: {nonfinite} of {mixture.numel()} samples are NaN or infinite; finite samples were expected"
        )
    if mixture.numel() < MIN_SECONDS * sample_rate:
        raise AudioError(
            f"{name}: {mixture.numel() / sample_rate:.3f} s of audio ({mixture.numel()} samples at {sample_rate} Hz); "
            f"at least {MIN_SECONDS} s was expected"
        )
    peak = float(mixture.abs().max())
    if peak < SILENCE_PEAK:
        raise AudioError(
            f"{name}: silent (peak amplitude {peak:.3g}, below {SILENCE_PEAK:.0e}); a recording of speech was expected"
        )


def read_mixture(path: PathLike) -> Tuple[torch.Tensor, int]:
    """Reads an audio file as one mono float32 waveform, checked by :func:`check_mixture`.

    Any format and sampling rate libsndfile reads (WAV, FLAC, OGG, MP3, ...).
    Several channels are downmixed to their mean, with a logged notice.

    Arguments
    ---------
    path : str or os.PathLike
        The audio file.

    Returns
    -------
    Tuple[torch.Tensor, int]
        The [time] waveform and its sampling rate.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    AudioError
        If it is not audio libsndfile reads, or :func:`check_mixture` refuses it.

    Example
    -------
    >>> path = getfixture("tmp_path") / "stereo.wav"
    >>> sf.write(path, [[0.25, 0.1]] * 16000, 16000)
    >>> mixture, rate = read_mixture(path)
    >>> mixture.shape, rate
    (torch.Size([16000]), 16000)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, TypeError, RuntimeError) as error:
        # TypeError: a headerless format (RAW) that needs its sample rate and layout given.
        raise AudioError(
            f"{path}: not audio that libsndfile reads ({getattr(error, 'error_string', error)}); "
            "expected WAV, FLAC, OGG, MP3 or another of its formats (soundfile.available_formats())"
        ) from None
    mixture = torch.from_numpy(data)
    if mixture.shape[1] > 1:
        logger.warning(f"{path}: {mixture.shape[1]} channels, downmixed to mono (their mean)")
    mixture = mixture.mean(dim=1)
    check_mixture(mixture, rate, str(path))
    return mixture, rate


def write_sources(sources: torch.Tensor, sample_rate: int, paths: Sequence[PathLike]) -> None:
    """Writes source ``i`` to ``paths[i]`` as 32-bit float WAV: all files or none.

    Each file is written to a temporary name in its folder and renamed only
    once every file is written; on any error the temporary files are removed.
    The files get the usual mode of new files (``0o666`` less the umask).

    Arguments
    ---------
    sources : torch.Tensor
        [time, num_sources] waveforms.
    sample_rate : int
        Their sampling rate in Hz.
    paths : Sequence[str or os.PathLike]
        One output file per source (folders are created).

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> write_sources(torch.zeros(800, 2), 8000, [folder / "a_spk1.wav", folder / "a_spk2.wav"])
    >>> sorted(path.name for path in folder.iterdir())
    ['a_spk1.wav', 'a_spk2.wav']
    """
    if sources.shape[1] != len(paths):
        raise ValueError(f"{sources.shape[1]} sources for {len(paths)} output files")
    staged = []
    try:
        for i, path in enumerate(map(Path, paths)):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
            os.close(handle)
            staged.append(Path(temporary))
            sf.write(temporary, sources[:, i].float().cpu().numpy(), sample_rate, format="WAV", subtype="FLOAT")
            os.chmod(temporary, umasked(0o666))  # mkstemp's 0600 would hide the outputs from other users
        for temporary, path in zip(staged, paths):
            os.replace(temporary, path)
    except BaseException:
        for temporary in staged:
            temporary.unlink(missing_ok=True)
        raise
