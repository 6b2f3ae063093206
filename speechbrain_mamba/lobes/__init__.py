"""SpeechBrain lobes: Mamba mixers, the Mamba stack and the mask networks built on them."""

from speechbrain_mamba.lobes.dual_path import DualPathModel
from speechbrain_mamba.lobes.mamba import BiMamba, LayerNorm, Mamba, MambaBlock, MambaStack, MambaState, RMSNorm
from speechbrain_mamba.lobes.mamba_tasnet import MambaTasNetMaskNet
from speechbrain_mamba.lobes.norms import SingleGroupNorm, replace_single_group_norms
from speechbrain_mamba.lobes.sepmamba import BidirectionalMambaStack, SepMamba
from speechbrain_mamba.lobes.streaming import SepMambaStreamer

__all__ = [
    "BiMamba",
    "BidirectionalMambaStack",
    "DualPathModel",
    "LayerNorm",
    "Mamba",
    "MambaBlock",
    "MambaStack",
    "MambaState",
    "MambaTasNetMaskNet",
    "RMSNorm",
    "SepMamba",
    "SepMambaStreamer",
    "SingleGroupNorm",
    "replace_single_group_norms",
]
