"""Shared test helpers."""

from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_HPARAMS = REPO_ROOT / "hparams"


def load_model_hparams(name: str, **overrides) -> dict:
    """Loads ``hparams/<name>.yaml`` (the model definitions shared by all recipes)."""
    with open(MODEL_HPARAMS / f"{name}.yaml") as handle:
        return load_hyperpyyaml(handle, overrides)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
