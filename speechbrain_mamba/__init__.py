"""speechbrain-mamba: Mamba state-space models for speech separation in SpeechBrain."""

__version__ = "0.1.0"
