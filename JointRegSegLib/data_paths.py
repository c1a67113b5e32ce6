"""Where the shared data lives (training, benchmarks and larger checks; a user's clone has none)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """The shared data folder: ``$JRS_SHARED_DATA``, else ``<repository>/../shared/data``."""
    if os.environ.get("JRS_SHARED_DATA"):
        return Path(os.environ["JRS_SHARED_DATA"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def synthseg_labelmaps_dir() -> Path:
    """The SynthSeg whole-head label maps of the shared data (the synthetic methods' training source)."""
    return shared_data_dir() / "synthseg_labelmaps"
