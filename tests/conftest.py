"""Shared test fixtures. Tests run offline, on CPU, against real components (no mocks)."""

from __future__ import annotations

import os

# Set before anything imports img2dataset / wandb / hub clients.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from sd_core.config import Profile  # noqa: E402


@pytest.fixture
def data_root(tmp_path):
    """A fresh, empty data root for one test."""
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def tiny_profile(data_root) -> Profile:
    """The tiny profile rooted in the test's temporary data root."""
    return Profile.tiny(data_root)
