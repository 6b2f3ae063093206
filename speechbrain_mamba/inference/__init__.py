"""Inference: the pretrained interface, exporting trained models, separating files and long recordings.

- :class:`MambaSeparator`: ``MambaSeparator.from_hparams(source=folder)``, SpeechBrain's pretrained interface.
- :func:`export_model`: a training run (or a checkpoint folder) -> an inference folder it loads.
- :func:`separate_in_chunks`: long recordings in overlapping chunks, one speaker order throughout.
- :class:`CUDAGraphCache`: replays captured CUDA graphs of a forward, per input shape (short inputs).
- :func:`load_module_checkpoints`: strict loading of per-module checkpoints, Mamba-TasNet's releases included.
- Commands ``speechbrain-mamba-export`` and ``speechbrain-mamba-separate`` (``python -m speechbrain_mamba.inference``).
"""

from speechbrain_mamba.inference.audio import AudioError, check_mixture, read_mixture, write_sources
from speechbrain_mamba.inference.checkpoints import (
    CheckpointMismatchError,
    load_checkpoint_strict,
    load_module_checkpoints,
    mamba_tasnet_masknet_state_dict,
)
from speechbrain_mamba.inference.chunking import best_permutation, separate_in_chunks
from speechbrain_mamba.utils.cuda_graphs import CUDAGraphCache
from speechbrain_mamba.inference.export import export_model, find_checkpoint
from speechbrain_mamba.inference.interface import MambaSeparator

__all__ = [
    "AudioError",
    "CUDAGraphCache",
    "CheckpointMismatchError",
    "MambaSeparator",
    "best_permutation",
    "check_mixture",
    "export_model",
    "find_checkpoint",
    "load_checkpoint_strict",
    "load_module_checkpoints",
    "mamba_tasnet_masknet_state_dict",
    "read_mixture",
    "separate_in_chunks",
    "write_sources",
]
