"""SpeechBrain CSVs for the separation corpora (wsj0-mix, LibriMix, WHAM!, a custom layout), validated up front.

Each corpus layout is described as data (``_Layout``: the folders above the splits, the split folders, the
subfolder of each CSV column) and goes through one code path: find the split level under ``data_folder``
(users pass different depths), check every file of every split, and only then write the CSVs, each one
atomically. All problems found are reported together in one ``DataError`` naming the files and what was
expected, instead of a crash in the middle of the first epoch.

The CSVs are those of SpeechBrain's separation recipes:
``ID,duration,mix_wav,mix_wav_format,mix_wav_opts,s1_wav,...[,noise_wav,noise_wav_format,noise_wav_opts]``
with absolute paths and the mixture's duration in seconds.
"""

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
AUDIO_SUFFIXES = (".wav", ".flac")
# Integer PCM (and FLAC) cannot hold NaN or inf: only these subtypes need their samples read.
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
MAX_LISTED = 10


class DataError(ValueError):
    """Bad input data; the message names the offending file or folder and what was expected.

    Example
    -------
    >>> prepare_custom("/no/such/folder", "/tmp")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    speechbrain_mamba.separation.data_prep.DataError: /no/such/folder: data folder does not exist; expected ...
    """


@dataclass(frozen=True)
class _Layout:
    """A corpus layout: ``<data_folder>/<levels...>/<split>/<subfolder>/<ID>.wav``."""

    corpus: str  # name used in messages
    levels: Tuple[str, ...]  # folders between data_folder and the split folders
    splits: Dict[str, Tuple[str, ...]]  # split key -> accepted folder names, the first existing one wins
    csv_names: Dict[str, str]  # split key -> CSV file name
    columns: Dict[str, str]  # CSV column prefix -> subfolder, mixture first
    optional: Dict[str, str] = field(default_factory=dict)  # columns used when any split has the subfolder

    def describe(self) -> str:
        splits = ",".join("|".join(names) for names in self.splits.values())
        subfolders = ",".join(list(self.columns.values()) + [f"[{sub}]" for sub in self.optional.values()])
        path = "/".join(("<data_folder>",) + self.levels + (f"{{{splits}}}", f"{{{subfolders}}}", "<ID>.wav"))
        return path + (" (data_folder may also be any folder along this path)" if self.levels else "")


def _abspath(folder: PathLike) -> Path:
    """Absolute path that keeps symbolic links (corpora are often linked in)."""
    return Path(os.path.abspath(os.path.expanduser(folder)))


def _listing(folder: Path) -> str:
    """The first entries of a folder, for error messages."""
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    if not entries:
        return "nothing"
    return ", ".join(entries[:MAX_LISTED]) + (f", ... ({len(entries)} entries)" if len(entries) > MAX_LISTED else "")


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}")


def _resolve_root(layout: _Layout, data_folder: PathLike) -> Path:
    """The folder holding the split folders, whether data_folder points at it or at a folder above it."""
    folder = _abspath(data_folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder does not exist; expected {layout.describe()}")
    if not any(folder.iterdir()):
        raise DataError(f"{folder}: data folder is empty; expected {layout.describe()}")
    candidates = [folder.joinpath(*layout.levels[depth:]) for depth in range(len(layout.levels) + 1)]
    for candidate in candidates:
        if any((candidate / name).is_dir() for names in layout.splits.values() for name in names):
            logger.info("Reading %s from %s", layout.corpus, candidate)
            return candidate
    raise DataError(
        f"{folder}: no {layout.corpus} split folders found; tried {', '.join(map(str, candidates))}. "
        f"Expected {layout.describe()}; {folder} contains: {_listing(folder)}"
    )


def _check_audio(path: Path, sample_rate: int, check_content: bool) -> Tuple[Optional[int], List[str]]:
    """Checks one file from its header (and its samples if stored as floats); returns (frames, problems)."""
    try:
        with sf.SoundFile(str(path)) as audio:
            frames, problems = audio.frames, []
            if frames == 0:
                problems.append(f"{path}: empty audio (0 samples), expected speech")
            if audio.samplerate != sample_rate:
                problems.append(
                    f"{path}: sample rate {audio.samplerate} Hz, expected {sample_rate} Hz "
                    "(set sample_rate or resample the corpus)"
                )
            if audio.channels != 1:
                problems.append(f"{path}: {audio.channels} channels, expected 1 (mono)")
            if check_content and frames and audio.subtype in FLOAT_SUBTYPES:
                if not np.isfinite(audio.read(dtype="float64")).all():
                    problems.append(f"{path}: NaN or infinite samples, expected finite audio")
    except sf.SoundFileError as error:
        return None, [f"{path}: unreadable audio, expected a WAV or FLAC file ({error})"]
    return (frames if not problems else None), problems


def _audio_files(folder: Path) -> Tuple[Dict[str, Path], List[str]]:
    """The audio files of a folder by ID (file stem), and the IDs that occur twice."""
    files: Dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        if path.stem in files:
            other = files[path.stem].name
            problems.append(f"{path}: duplicate ID {path.stem!r} (also {other}), expected one file per ID")
        files[path.stem] = path
    return files, problems


def _scan_split(
    split_dir: Path, columns: Dict[str, str], sample_rate: int, check_content: bool
) -> Tuple[List[Dict[str, object]], List[str]]:
    """Checks one split and returns its CSV rows and its problems."""
    absent = [sub for sub in columns.values() if not (split_dir / sub).is_dir()]
    if absent:
        expected = ", ".join(sub + "/" for sub in columns.values())
        found = _listing(split_dir)
        return [], [f"{split_dir}: missing subfolder {_names(absent)}; expected {expected}; found: {found}"]
    files, problems = {}, []
    for prefix, sub in columns.items():
        files[prefix], duplicates = _audio_files(split_dir / sub)
        problems += duplicates
    mix_prefix, *source_prefixes = columns
    mixtures, mix_dir = files[mix_prefix], split_dir / columns[mix_prefix]
    if not mixtures:
        return [], problems + [f"{mix_dir}: no audio files, expected mixtures ({'/'.join(AUDIO_SUFFIXES)})"]
    for prefix in source_prefixes:
        folder = split_dir / columns[prefix]
        missing = sorted(mixtures[i].name for i in mixtures.keys() - files[prefix].keys())
        unmatched = sorted(files[prefix][i].name for i in files[prefix].keys() - mixtures.keys())
        if missing:
            problems.append(f"{folder}: missing {len(missing)} file(s) present in {mix_dir}: {_names(missing)}")
        if unmatched:
            problems.append(f"{folder}: {len(unmatched)} file(s) with no mixture in {mix_dir}: {_names(unmatched)}")
    rows = []
    for utt_id, mix_path in mixtures.items():
        mix_frames, found = _check_audio(mix_path, sample_rate, check_content)
        problems += found
        row: Dict[str, object] = {"ID": utt_id, "duration": (mix_frames or 0) / sample_rate}
        for prefix in columns:
            path = files[prefix].get(utt_id)
            if path is None:
                continue
            if prefix != mix_prefix:
                frames, found = _check_audio(path, sample_rate, check_content)
                problems += found
                if frames and mix_frames and frames != mix_frames:
                    problems.append(f"{path}: {frames} samples, expected {mix_frames} like its mixture {mix_path}")
            extension = path.suffix[1:].lower()
            row.update({f"{prefix}_wav": str(path), f"{prefix}_wav_format": extension, f"{prefix}_wav_opts": ""})
        rows.append(row)
    return rows, problems


def _header(columns: Dict[str, str]) -> List[str]:
    return ["ID", "duration"] + [f"{prefix}_wav{part}" for prefix in columns for part in ("", "_format", "_opts")]


# Written beside the CSVs: the settings they were checked with, which reuse must match.
SETTINGS_FILE = "data_prep_settings.json"


def _reusable(csv_path: Path, header: List[str], split_dir: Path) -> bool:
    """Whether an existing CSV has these columns and points into this split (not another version of the corpus)."""
    with open(csv_path, newline="") as handle:
        reader = csv.reader(handle)
        if next(reader, None) != header:
            return False
        first = next(reader, None)
    return first is not None and first[2].startswith(str(split_dir) + os.sep)


def _write_csv(path: Path, header: List[str], rows: List[Dict[str, object]]) -> None:
    """Writes a CSV through a temporary file and a rename, so an interruption never leaves half a CSV."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _prepare(
    layout: _Layout,
    data_folder: PathLike,
    save_folder: PathLike,
    sample_rate: int,
    skip_prep: bool,
    check_content: bool,
    overwrite: bool,
) -> Dict[str, Path]:
    """The code path shared by all layouts: resolve, validate everything, then write the CSVs."""
    save_folder = _abspath(save_folder)
    csv_paths = {key: save_folder / name for key, name in layout.csv_names.items()}
    if skip_prep:
        missing = [str(path) for path in csv_paths.values() if not path.is_file()]
        if missing:
            raise DataError(f"{_names(missing)}: skip_prep=True but no such CSV; run once with skip_prep=False")
        logger.info("skip_prep=True: using the CSVs in %s as they are", save_folder)
        return csv_paths

    root = _resolve_root(layout, data_folder)
    split_dirs, problems = {}, []
    for key, names in layout.splits.items():
        found = [root / name for name in names if (root / name).is_dir()]
        if found:
            split_dirs[key] = found[0]
        else:
            problems.append(
                f"{root}: missing split folder {' or '.join(names)}/; expected {layout.describe()}; "
                f"found: {_listing(root)}"
            )
    columns = dict(layout.columns)
    for prefix, sub in layout.optional.items():
        if any((split_dir / sub).is_dir() for split_dir in split_dirs.values()):
            columns[prefix] = sub
    header = _header(columns)

    # A CSV's files were checked for one sample rate (and, with check_content, for NaN/inf): another setting
    # must check them again, whatever the columns and folders say.
    settings = {"sample_rate": sample_rate, "check_content": check_content}
    settings_path = save_folder / SETTINGS_FILE
    if not overwrite and not problems and all(path.is_file() for path in csv_paths.values()):
        same_settings = settings_path.is_file() and json.loads(settings_path.read_text()) == settings
        if same_settings and all(_reusable(csv_paths[key], header, split_dirs[key]) for key in csv_paths):
            logger.info("Reusing the existing CSVs in %s (pass overwrite=True to rebuild them)", save_folder)
            return csv_paths
        logger.info("The CSVs in %s were made with other settings, columns or data folder: rebuilding them",
                    save_folder)

    rows = {}
    for key, split_dir in split_dirs.items():
        rows[key], found = _scan_split(split_dir, columns, sample_rate, check_content)
        problems += found
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        listed = "\n".join(f"  - {problem}" for problem in problems[:MAX_LISTED])
        raise DataError(f"{layout.corpus} in {root}: {len(problems)} problem(s), no CSV written:\n{listed}{more}")

    save_folder.mkdir(parents=True, exist_ok=True)
    settings_path.unlink(missing_ok=True)  # written last: an interrupted rewrite is never reused
    for key, path in csv_paths.items():
        _write_csv(path, header, rows[key])
        logger.info("Wrote %s (%d mixtures from %s)", path, len(rows[key]), split_dirs[key])
    settings_path.write_text(json.dumps(settings))
    return csv_paths


def _sources(num_spks: int) -> Dict[str, str]:
    return {f"s{i}": f"s{i}" for i in range(1, num_spks + 1)}


def prepare_wsj0mix(
    data_folder: PathLike,
    save_folder: PathLike,
    num_spks: int = 2,
    sample_rate: int = 8000,
    version: str = "min",
    skip_prep: bool = False,
    check_content: bool = True,
    overwrite: bool = False,
) -> Dict[str, Path]:
    """Writes ``wsj_tr.csv``, ``wsj_cv.csv`` and ``wsj_tt.csv`` for wsj0-2mix or wsj0-3mix.

    Layout: ``<data_folder>/{2,3}speakers/wav{8k,16k}/{min,max}/{tr,cv,tt}/{mix,s1,s2[,s3]}/<ID>.wav``;
    data_folder may also point at ``2speakers``, ``wav8k`` or ``wav8k/min``.

    Arguments
    ---------
    data_folder : str or Path
        Root of the generated wsj0-mix (or a folder along the layout above).
    save_folder : str or Path
        Where the CSVs are written (created if needed).
    num_spks : int
        2 or 3 speakers.
    sample_rate : int
        8000 or 16000; every file must have it.
    version : str
        "min" or "max".
    skip_prep : bool
        Return the existing CSVs without looking at the data (error if they do not exist).
    check_content : bool
        Also read the samples of float-coded files to find NaN or inf (integer PCM cannot hold them).
    overwrite : bool
        Rebuild the CSVs even if matching ones exist.

    Returns
    -------
    dict
        ``{"train": Path, "valid": Path, "test": Path}``, the CSV paths.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("tr", "cv", "tt"):
    ...     for sub in ("mix", "s1", "s2"):
    ...         (root / "2speakers/wav8k/min" / split / sub).mkdir(parents=True)
    ...         sf.write(root / "2speakers/wav8k/min" / split / sub / "utt1.wav", np.zeros(1600), 8000)
    >>> csvs = prepare_wsj0mix(root, root / "save")
    >>> csvs["train"].name
    'wsj_tr.csv'
    >>> print(csvs["test"].read_text().splitlines()[0])
    ID,duration,mix_wav,mix_wav_format,mix_wav_opts,s1_wav,s1_wav_format,s1_wav_opts,s2_wav,s2_wav_format,s2_wav_opts
    >>> csvs["test"].read_text().splitlines()[1].startswith("utt1,0.2," + str(root))
    True
    """
    _check_choice("num_spks", num_spks, (2, 3))
    _check_choice("sample_rate", sample_rate, (8000, 16000))
    _check_choice("version", version, ("min", "max"))
    layout = _Layout(
        corpus=f"wsj0-{num_spks}mix",
        levels=(f"{num_spks}speakers", f"wav{sample_rate // 1000}k", version),
        splits={"train": ("tr",), "valid": ("cv",), "test": ("tt",)},
        csv_names={"train": "wsj_tr.csv", "valid": "wsj_cv.csv", "test": "wsj_tt.csv"},
        columns={"mix": "mix", **_sources(num_spks)},
    )
    return _prepare(layout, data_folder, save_folder, sample_rate, skip_prep, check_content, overwrite)


def prepare_librimix(
    data_folder: PathLike,
    save_folder: PathLike,
    num_spks: int = 2,
    sample_rate: int = 8000,
    version: str = "min",
    condition: str = "clean",
    skip_prep: bool = False,
    check_content: bool = True,
    overwrite: bool = False,
) -> Dict[str, Path]:
    """Writes ``libri{N}mix_train.csv``, ``libri{N}mix_dev.csv`` and ``libri{N}mix_test.csv``.

    Layout: ``<data_folder>/wav{8k,16k}/{min,max}/{train-360,dev,test}/{mix_clean,mix_both,s1,s2[,s3],noise}``,
    with data_folder the ``Libri2Mix`` (``Libri3Mix``) folder or its parent; ``train-100`` is used when there is
    no ``train-360``.

    Arguments
    ---------
    data_folder : str or Path
        The ``Libri{N}Mix`` folder, its parent, or a folder below it along the layout above.
    save_folder : str or Path
        Where the CSVs are written (created if needed).
    num_spks : int
        2 or 3 speakers.
    sample_rate : int
        8000 or 16000; every file must have it.
    version : str
        "min" or "max".
    condition : str
        "clean": mixtures from ``mix_clean``; "noisy": mixtures from ``mix_both`` plus ``noise_wav`` columns.
    skip_prep : bool
        Return the existing CSVs without looking at the data (error if they do not exist).
    check_content : bool
        Also read the samples of float-coded files to find NaN or inf (integer PCM cannot hold them).
    overwrite : bool
        Rebuild the CSVs even if matching ones exist.

    Returns
    -------
    dict
        ``{"train": Path, "valid": Path, "test": Path}``, the CSV paths.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("train-360", "dev", "test"):
    ...     for sub in ("mix_both", "s1", "s2", "noise"):
    ...         (root / "Libri2Mix/wav8k/min" / split / sub).mkdir(parents=True)
    ...         sf.write(root / "Libri2Mix/wav8k/min" / split / sub / "a_b.wav", np.zeros(1600), 8000)
    >>> csvs = prepare_librimix(root / "Libri2Mix", root / "save", condition="noisy")
    >>> [path.name for path in csvs.values()]
    ['libri2mix_train.csv', 'libri2mix_dev.csv', 'libri2mix_test.csv']
    >>> csvs["valid"].read_text().splitlines()[0].endswith("noise_wav,noise_wav_format,noise_wav_opts")
    True
    """
    _check_choice("num_spks", num_spks, (2, 3))
    _check_choice("sample_rate", sample_rate, (8000, 16000))
    _check_choice("version", version, ("min", "max"))
    _check_choice("condition", condition, ("clean", "noisy"))
    columns = {"mix": "mix_clean", **_sources(num_spks)}
    if condition == "noisy":
        columns.update(mix="mix_both", noise="noise")
    prefix = f"libri{num_spks}mix"
    layout = _Layout(
        corpus=f"Libri{num_spks}Mix",
        levels=(f"Libri{num_spks}Mix", f"wav{sample_rate // 1000}k", version),
        splits={"train": ("train-360", "train-100"), "valid": ("dev",), "test": ("test",)},
        csv_names={"train": f"{prefix}_train.csv", "valid": f"{prefix}_dev.csv", "test": f"{prefix}_test.csv"},
        columns=columns,
    )
    return _prepare(layout, data_folder, save_folder, sample_rate, skip_prep, check_content, overwrite)


def prepare_wham(
    data_folder: PathLike,
    save_folder: PathLike,
    sample_rate: int = 8000,
    version: str = "min",
    skip_prep: bool = False,
    check_content: bool = True,
    overwrite: bool = False,
) -> Dict[str, Path]:
    """Writes ``whamorg_tr.csv``, ``whamorg_cv.csv`` and ``whamorg_tt.csv`` for WHAM! (noisy wsj0-2mix).

    Layout: ``<data_folder>/wav{8k,16k}/{min,max}/{tr,cv,tt}/{mix_both,s1,s2,noise}``; the mixture is ``mix_both``.

    Arguments
    ---------
    data_folder : str or Path
        The WHAM! root (or a folder along the layout above).
    save_folder : str or Path
        Where the CSVs are written (created if needed).
    sample_rate : int
        8000 or 16000; every file must have it.
    version : str
        "min" or "max".
    skip_prep : bool
        Return the existing CSVs without looking at the data (error if they do not exist).
    check_content : bool
        Also read the samples of float-coded files to find NaN or inf (integer PCM cannot hold them).
    overwrite : bool
        Rebuild the CSVs even if matching ones exist.

    Returns
    -------
    dict
        ``{"train": Path, "valid": Path, "test": Path}``, the CSV paths.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("tr", "cv", "tt"):
    ...     for sub in ("mix_both", "s1", "s2", "noise"):
    ...         (root / "wav8k/min" / split / sub).mkdir(parents=True)
    ...         sf.write(root / "wav8k/min" / split / sub / "u.wav", np.zeros(800), 8000)
    >>> csvs = prepare_wham(root, root / "save")
    >>> for field in csvs["train"].read_text().splitlines()[1].replace(str(root), "ROOT").split(",wav,,"):
    ...     print(field)
    u,0.1,ROOT/wav8k/min/tr/mix_both/u.wav
    ROOT/wav8k/min/tr/s1/u.wav
    ROOT/wav8k/min/tr/s2/u.wav
    ROOT/wav8k/min/tr/noise/u.wav,wav,
    """
    _check_choice("sample_rate", sample_rate, (8000, 16000))
    _check_choice("version", version, ("min", "max"))
    layout = _Layout(
        corpus="WHAM!",
        levels=(f"wav{sample_rate // 1000}k", version),
        splits={"train": ("tr",), "valid": ("cv",), "test": ("tt",)},
        csv_names={"train": "whamorg_tr.csv", "valid": "whamorg_cv.csv", "test": "whamorg_tt.csv"},
        columns={"mix": "mix_both", **_sources(2), "noise": "noise"},
    )
    return _prepare(layout, data_folder, save_folder, sample_rate, skip_prep, check_content, overwrite)


def prepare_custom(
    data_folder: PathLike,
    save_folder: PathLike,
    num_spks: int = 2,
    sample_rate: int = 8000,
    skip_prep: bool = False,
    check_content: bool = True,
    overwrite: bool = False,
) -> Dict[str, Path]:
    """Writes ``custom_train.csv``, ``custom_valid.csv`` and ``custom_test.csv`` for users' own mixtures.

    Layout: ``<data_folder>/{train,valid,test}/{mix,s1,s2[,s3...][,noise]}/<ID>.wav`` (or ``.flac``), with the
    same file names in each subfolder. If any split has a ``noise`` folder, all must, and noise columns are added.

    Arguments
    ---------
    data_folder : str or Path
        The folder holding ``train``, ``valid`` and ``test``.
    save_folder : str or Path
        Where the CSVs are written (created if needed).
    num_spks : int
        Number of sources (s1 ... sN) per mixture.
    sample_rate : int
        Every file must have this sample rate.
    skip_prep : bool
        Return the existing CSVs without looking at the data (error if they do not exist).
    check_content : bool
        Also read the samples of float-coded files to find NaN or inf (integer PCM cannot hold them).
    overwrite : bool
        Rebuild the CSVs even if matching ones exist.

    Returns
    -------
    dict
        ``{"train": Path, "valid": Path, "test": Path}``, the CSV paths.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("train", "valid", "test"):
    ...     for sub in ("mix", "s1", "s2"):
    ...         (root / split / sub).mkdir(parents=True)
    ...         sf.write(root / split / sub / "x.flac", np.zeros(3200), 16000)
    >>> csvs = prepare_custom(root, root / "save", sample_rate=16000)
    >>> csvs["valid"].read_text().splitlines()[1].split(",")[:4] == ["x", "0.2", str(root / "valid/mix/x.flac"), "flac"]
    True
    """
    if num_spks < 1:
        raise ValueError(f"num_spks={num_spks} is not supported; expected at least 1")
    layout = _Layout(
        corpus="custom separation data",
        levels=(),
        splits={"train": ("train",), "valid": ("valid",), "test": ("test",)},
        csv_names={"train": "custom_train.csv", "valid": "custom_valid.csv", "test": "custom_test.csv"},
        columns={"mix": "mix", **_sources(num_spks)},
        optional={"noise": "noise"},
    )
    return _prepare(layout, data_folder, save_folder, sample_rate, skip_prep, check_content, overwrite)


PREPARERS = {"wsj0mix": prepare_wsj0mix, "librimix": prepare_librimix, "wham": prepare_wham, "custom": prepare_custom}


def prepare_data(
    dataset: str, data_folder: PathLike, save_folder: PathLike, num_spks: int = 2, sample_rate: int = 8000, **kwargs
) -> Dict[str, Path]:
    """Prepares the CSVs of one of the corpora in ``PREPARERS``, the entry point for recipes.

    Arguments
    ---------
    dataset : str
        "wsj0mix", "librimix", "wham" or "custom".
    data_folder : str or Path
        The corpus folder (see the ``prepare_*`` function of the dataset).
    save_folder : str or Path
        Where the CSVs are written.
    num_spks : int
        Number of speakers (WHAM! has 2).
    sample_rate : int
        Sample rate every file must have.
    **kwargs
        Passed on to the ``prepare_*`` function (version, condition, skip_prep, check_content, overwrite).

    Returns
    -------
    dict
        ``{"train": Path, "valid": Path, "test": Path}``, the CSV paths.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("train", "valid", "test"):
    ...     for sub in ("mix", "s1", "s2", "s3"):
    ...         (root / split / sub).mkdir(parents=True)
    ...         sf.write(root / split / sub / "m.wav", np.zeros(1600), 8000)
    >>> sorted(prepare_data("custom", root, root / "save", num_spks=3))
    ['test', 'train', 'valid']
    >>> prepare_data("wsj0-2mix", root, root / "save", num_spks=2)
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'wsj0-2mix'; expected one of wsj0mix, librimix, wham, custom
    """
    if dataset not in PREPARERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(PREPARERS)}")
    if dataset == "wham":
        _check_choice("num_spks", num_spks, (2,))
    else:
        kwargs["num_spks"] = num_spks
    return PREPARERS[dataset](data_folder, save_folder, sample_rate=sample_rate, **kwargs)


SPEAKER_LAYOUTS = {
    # corpus: (glob pattern under the folder, speaker id of a file, expected layout for messages)
    "wsj0": ("**/*", lambda path: path.stem[:3], "<folder>/**/<spk><utt>.wav (speaker id: first 3 characters)"),
    "librispeech": ("*/*/*", lambda path: path.parent.parent.name, "<folder>/<spk>/<chapter>/<utt>.flac"),
}


def list_speaker_utterances(folder: PathLike, corpus: str) -> Dict[str, List[Path]]:
    """Single-speaker utterances by speaker, the material of dynamic mixing.

    Arguments
    ---------
    folder : str or Path
        For "wsj0", a folder searched recursively (typically ``wsj0/si_tr_s``), the speaker id being the first
        3 characters of the file name; for "librispeech", a split such as ``train-clean-360`` laid out as
        ``<spk>/<chapter>/<spk>-<chapter>-<utt>.flac``.
    corpus : str
        "wsj0" or "librispeech".

    Returns
    -------
    dict
        Speaker id -> sorted utterance paths, speakers sorted.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile as sf
    >>> root = Path(tempfile.mkdtemp())
    >>> for spk, chapter, utt in (("19", "198", "0001"), ("19", "198", "0002"), ("26", "495", "0000")):
    ...     (root / spk / chapter).mkdir(parents=True, exist_ok=True)
    ...     sf.write(root / spk / chapter / f"{spk}-{chapter}-{utt}.flac", np.zeros(160), 16000)
    >>> {spk: len(paths) for spk, paths in list_speaker_utterances(root, "librispeech").items()}
    {'19': 2, '26': 1}
    """
    if corpus not in SPEAKER_LAYOUTS:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {', '.join(SPEAKER_LAYOUTS)}")
    pattern, speaker_of, expected = SPEAKER_LAYOUTS[corpus]
    folder = _abspath(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder does not exist; expected {corpus} utterances as {expected}")
    speakers: Dict[str, List[Path]] = {}
    for path in sorted(folder.glob(pattern)):
        if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
            speakers.setdefault(speaker_of(path), []).append(path)
    if not speakers:
        raise DataError(
            f"{folder}: no audio found matching {folder}/{pattern} with suffix {'/'.join(AUDIO_SUFFIXES)}; "
            f"expected {corpus} utterances as {expected}"
        )
    if len(speakers) < 2:
        raise DataError(
            f"{folder}: only {len(speakers)} speaker ({_names(list(speakers))}), expected at least 2 to mix; "
            f"expected {corpus} utterances as {expected}"
        )
    return dict(sorted(speakers.items()))
