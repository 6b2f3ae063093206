"""The ``speechbrain-mamba-separate`` and ``speechbrain-mamba-export`` commands."""

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import soundfile as sf
import torch
import torchaudio
from ruamel.yaml.error import YAMLError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from speechbrain_mamba.inference.audio import AudioError, read_mixture, write_sources
from speechbrain_mamba.inference.checkpoints import CheckpointMismatchError
from speechbrain_mamba.inference.export import export_model
from speechbrain_mamba.inference.interface import CHUNK_SECONDS, OVERLAP_SECONDS, MambaSeparator
from speechbrain_mamba.utils.cpu import keep_freed_memory

logger = logging.getLogger("speechbrain_mamba.inference")
# What a folder is searched for: the formats libsndfile reads, less headerless RAW (which needs its rate given).
AUDIO_SUFFIXES = {f".{name.lower()}" for name in sf.available_formats()} - {".raw"}


def output_paths(inputs: Sequence[Path], output_dir: Path, num_spks: int) -> Dict[Path, List[Path]]:
    """The files to separate and the outputs of each: ``<output_dir>/<subfolder>/<stem>_spk<i>.wav``.

    A file is separated into ``<output_dir>/<stem>_spk1.wav, ...``; a folder is
    searched recursively for audio files (by extension, the formats libsndfile
    reads but headerless RAW) and its subfolders are kept under ``output_dir``.
    When ``output_dir`` is inside a folder, it is left out of that folder's
    search, so that earlier outputs are not separated again.

    Arguments
    ---------
    inputs : Sequence[Path]
        Audio files and folders.
    output_dir : Path
        Where the separated files go.
    num_spks : int
        Sources per input.

    Returns
    -------
    Dict[Path, List[Path]]
        Input file -> its ``num_spks`` output files, in order.

    Raises
    ------
    FileNotFoundError
        For a missing input, or a folder without audio files.
    ValueError
        If two inputs would be written to the same outputs, or an output is also an input.

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> (folder / "day1").mkdir()
    >>> sf.write(folder / "day1" / "talk.flac", [0.1] * 800, 8000)
    >>> planned = output_paths([folder], Path("out"), 2)
    >>> [str(path) for path in planned[folder / "day1" / "talk.flac"]]
    ['out/day1/talk_spk1.wav', 'out/day1/talk_spk2.wav']
    """
    planned: Dict[Path, List[Path]] = {}
    written_by: Dict[Path, Path] = {}
    resolved_output_dir = output_dir.resolve()
    for item in inputs:
        if item.is_dir():
            # Earlier outputs in a subfolder of the input; outputs written beside their inputs are refused below.
            inside = item.resolve() in resolved_output_dir.parents
            files = sorted(
                p for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                and not (inside and resolved_output_dir in p.resolve().parents)
            )
            if not files:
                raise FileNotFoundError(f"{item}: no audio files in this folder ({', '.join(sorted(AUDIO_SUFFIXES))})")
            pairs = [(path, output_dir / path.relative_to(item).parent) for path in files]
        elif item.exists():
            pairs = [(item, output_dir)]
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        for path, folder in pairs:
            outputs = [folder / f"{path.stem}_spk{i + 1}.wav" for i in range(num_spks)]
            if outputs[0] in written_by and written_by[outputs[0]] != path:
                raise ValueError(f"{written_by[outputs[0]]} and {path} would both be written to {outputs[0]}")
            written_by[outputs[0]] = path
            planned[path] = outputs
    inputs_resolved = {path.resolve(): path for path in planned}
    for path, outputs in planned.items():
        for output in outputs:
            if output.resolve() in inputs_resolved:
                raise ValueError(
                    f"{output} is both an input and the output of {path}; choose another output folder (-o)"
                )
    return planned


def separate_files(
    separator: MambaSeparator,
    planned: Dict[Path, List[Path]],
    overwrite: bool = False,
    chunk_seconds: float = CHUNK_SECONDS,
    overlap_seconds: float = OVERLAP_SECONDS,
) -> int:
    """Separates each input into its output files at the input's sampling rate; returns the number of failures.

    Outputs are resampled back from the model's rate to the input's, and cut
    to the input's exact length, so that they line up sample for sample with
    the input (the model's band limit stays: nothing above half its rate).
    An input whose outputs exist is skipped unless ``overwrite``. An input
    that cannot be read or separated (:class:`AudioError`) is reported and
    counted, and the others go on; its outputs are not written. So is an
    input whose outputs cannot be written (``OSError``).

    Arguments
    ---------
    separator : MambaSeparator
        The model.
    planned : Dict[Path, List[Path]]
        Input file -> output files (:func:`output_paths`).
    overwrite : bool
        Replace existing outputs.
    chunk_seconds, overlap_seconds : float
        See :meth:`MambaSeparator.separate_signal`.

    Returns
    -------
    int
        How many inputs failed.

    Example
    -------
    >>> from speechbrain_mamba.lobes import SepMamba
    >>> separator = MambaSeparator(modules={"model": SepMamba(dim=4, num_layers=1)},
    ...                            hparams={"num_spks": 2, "sample_rate": 8000}, run_opts={"device": "cpu"})
    >>> folder = getfixture("tmp_path")
    >>> sf.write(folder / "mix.wav", [0.3, -0.2, 0.1, 0.0] * 1000, 16000)
    >>> separate_files(separator, output_paths([folder / "mix.wav"], folder / "out", 2))
    0
    >>> [(sf.info(path).samplerate, sf.info(path).frames) for path in sorted((folder / "out").iterdir())]
    [(16000, 4000), (16000, 4000)]
    """
    failures = skipped = 0
    with logging_redirect_tqdm(loggers=[logger]):
        for path, outputs in tqdm(planned.items(), unit="file", disable=len(planned) < 2):
            existing = [str(out) for out in outputs if out.exists()]
            if existing and not overwrite:
                logger.warning(f"{path}: skipped, its outputs exist ({', '.join(existing)}); --overwrite to redo")
                skipped += 1
                continue
            try:
                mixture, rate = read_mixture(path)
                sources = separator.separate_signal(mixture, rate, chunk_seconds, overlap_seconds)
                sources = torchaudio.functional.resample(sources.T, separator.hparams.sample_rate, rate).T
                write_sources(sources[: len(mixture)], rate, outputs)
            except (AudioError, OSError) as error:  # OSError: FileNotFoundError, or outputs that cannot be written
                logger.error(f"{path}: {error}" if not str(error).startswith(str(path)) else str(error))
                failures += 1
    done = len(planned) - skipped - failures
    (logger.error if failures else logger.info)(
        f"Separated {done} of {len(planned)} inputs ({skipped} skipped, {failures} failed)"
    )
    return failures


def separate_main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``speechbrain-mamba-separate`` command (``python -m speechbrain_mamba.inference``); see its ``--help``.

    Arguments
    ---------
    argv : Sequence[str], optional
        The command line after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, 1 if some inputs failed (the others are written),
        2 for a usage error (missing input or model, unreadable model, output folder that is a file, unknown or
        unavailable device; nothing written).

    Example
    -------
    >>> separate_main(["mixture.wav", "-m", "no/such/model"])  # the error goes to stderr
    2
    """
    parser = argparse.ArgumentParser(
        prog="speechbrain-mamba-separate",
        description="Separate the speakers of audio files into <output-dir>/<name>_spk1.wav, _spk2.wav, ... "
        "(32-bit float WAV at the input's sampling rate and length).",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="audio files and folders (searched recursively)")
    parser.add_argument(
        "-m", "--model", required=True,
        help="an inference folder written by speechbrain-mamba-export, or any from_hparams source",
    )
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("separated"), help="default: ./separated")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast (default fp32)")
    parser.add_argument(
        "--chunk-seconds", type=float, default=CHUNK_SECONDS,
        help=f"long files go through the model in chunks this long (default {CHUNK_SECONDS:g}; 0: whole files)",
    )
    parser.add_argument(
        "--overlap-seconds", type=float, default=OVERLAP_SECONDS,
        help=f"overlap of chunks, where speakers are matched and chunks cross-faded (default {OVERLAP_SECONDS:g})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip the input)")
    parser.add_argument("--savedir", default=None, help="where a remote model is downloaded")
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help="on CUDA, replay captured graphs per chunk shape (faster for many short files or chunks)",
    )
    args = parser.parse_args(argv)
    if args.chunk_seconds > 0 and not 0 < args.overlap_seconds <= args.chunk_seconds / 2:
        parser.error("--overlap-seconds must be above 0 and at most half of --chunk-seconds")
    _log_to_stderr()
    try:
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise ValueError(f"{args.output_dir} is a file; an output folder was expected (-o)")
        _check_device(args.device)
        _check_model_source(args.model)
        separator = MambaSeparator.from_hparams(
            source=args.model, savedir=args.savedir, run_opts={"device": args.device, "precision": args.precision}
        )
        if args.cuda_graphs:
            separator.use_cuda_graphs()
        if separator.device_type == "cpu":
            # This process only separates: let glibc reuse freed tensors instead of page-faulting fresh ones.
            keep_freed_memory()
        planned = output_paths(args.inputs, args.output_dir, separator.hparams.num_spks)
    except (FileNotFoundError, ValueError, CheckpointMismatchError) as error:
        logger.error(str(error))
        return 2
    except YAMLError as error:
        logger.error(f"{args.model}: its hyperparams.yaml is not valid YAML: {' '.join(str(error).split())}")
        return 2
    failures = separate_files(separator, planned, args.overwrite, args.chunk_seconds, args.overlap_seconds)
    return 1 if failures else 0


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``speechbrain-mamba-export`` command (``python -m speechbrain_mamba.inference export``); see its ``--help``.

    Arguments
    ---------
    argv : Sequence[str], optional
        The command line after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, or 2 with a one-line error on stderr (nothing written).

    Example
    -------
    >>> export_main(["no/such/run", "exported"])  # the error goes to stderr
    2
    """
    parser = argparse.ArgumentParser(
        prog="speechbrain-mamba-export",
        description="Write a trained model as an inference folder (hyperparams.yaml + <module>.ckpt) for "
        "speechbrain-mamba-separate and MambaSeparator.from_hparams.",
    )
    parser.add_argument("source", type=Path, help="a training run, results/<experiment>/<seed>, or a checkpoint folder")
    parser.add_argument("output", type=Path, help="the inference folder to write")
    parser.add_argument(
        "--hparams", type=Path, default=None,
        help="model definition instead of <source>/hyperparams.yaml (e.g. hparams/mamba_tasnet_m.yaml for a "
        "Mamba-TasNet release)",
    )
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="best: lowest validation loss")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        folder = export_model(args.source, args.output, args.hparams, args.checkpoint, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointMismatchError) as error:
        logger.error(str(error))
        return 2
    logger.info(f"Wrote {folder}")
    return 0


def _check_device(device: Optional[str]) -> None:
    """A clear error for a device torch does not know or this machine does not have, before the model is loaded."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; cpu, cuda, cuda:1, ... was expected") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_model_source(model: str) -> None:
    """Clear errors for a missing folder and for a training run (which needs exporting), before SpeechBrain
    takes a missing path for a HuggingFace model id."""
    path = Path(model)
    if (path / "save").is_dir():
        raise ValueError(
            f"{model} is a training run; export it first: speechbrain-mamba-export {model} <inference folder>"
        )
    hub_id = model.count("/") == 1 and not model.startswith((".", "~")) and not path.parent.is_dir()
    if not path.is_dir() and not (hub_id or model.startswith(("http:", "https:"))):
        raise FileNotFoundError(
            f"{model}: no such folder (an inference folder written by speechbrain-mamba-export, "
            "or a HuggingFace model id owner/name, was expected)"
        )


def _log_to_stderr() -> None:
    """This package's notices and errors on stderr (other libraries' at warning level and above)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
