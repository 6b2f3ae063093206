"""speechbrain-mamba: Mamba state-space models for speech separation in SpeechBrain."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "speechbrain_mamba" / "__init__.py").read_text()).group(1)

setup(
    name="speechbrain-mamba",
    version=VERSION,
    description="Mamba, BiMamba, DPMamba, Mamba-TasNet and SepMamba for speech separation in SpeechBrain",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["speechbrain_mamba", "speechbrain_mamba.*"]),
    # The embedded demo corpus (speechbrain_mamba/data/demo_speech/README.md: provenance, licences).
    package_data={"speechbrain_mamba": ["data/demo_speech/*.md", "data/demo_speech/*.tsv", "data/demo_speech/*/*.flac"]},
    python_requires=">=3.9",
    install_requires=[
        "speechbrain>=1.1.2",
        "torch>=2.4",  # F.rms_norm, torch.is_autocast_enabled(device_type), Triton 3 (libdevice)
        "torchaudio",
        "hyperpyyaml",
        "soundfile",
        "fast_bss_eval>=0.1.3",
    ],
    extras_require={
        # mamba-ssm's CUDA scan (backend="mamba_ssm"); source-only on PyPI: install with --no-build-isolation so
        # that it builds against the installed torch. Its selective scan needs no causal-conv1d (ours runs the
        # convolution).
        "mamba-ssm": ["mamba-ssm>=2.2"],
        "eval": ["mir_eval>=0.7"],
        "dev": ["pytest>=7", "mir_eval>=0.7"],
    },
    entry_points={
        "console_scripts": [
            "speechbrain-mamba-separate=speechbrain_mamba.inference.cli:separate_main",
            "speechbrain-mamba-export=speechbrain_mamba.inference.cli:export_main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Multimedia :: Sound/Audio :: Speech",
    ],
)
