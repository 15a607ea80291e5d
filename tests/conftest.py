"""Shared fixtures: one tiny synthetic FLAME2-like data set per test session (read-only: copy it
with ``synth_copy`` before changing anything)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SYNTH_FRAMES, SYNTH_SIZE, SYNTH_SEED = 120, 32, 7


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Folder of a 120-frame, 32-px synthetic data set (image folders, flame2.csv, label_ranges.tsv)."""
    from flame_kd.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, frames=SYNTH_FRAMES, image_size=SYNTH_SIZE, seed=SYNTH_SEED)
    return out


@pytest.fixture(scope="session")
def synth_csv(synth_dir) -> Path:
    """Path of the session's synthetic ``flame2.csv``. Do not modify the files it points to."""
    return synth_dir / "flame2.csv"


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> Path:
    """A private copy of the synthetic data set folder, free to break; returns its folder."""
    return Path(shutil.copytree(synth_dir, tmp_path / "synth"))
