"""The project skeleton: config presets and the Dagster code location."""

import subprocess
import sys
from pathlib import Path

import pytest

from sd_core.config import Profile, get_profile

ROOT = Path(__file__).resolve().parents[1]


def test_profiles_resolve_and_overrides_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_PROFILE", raising=False)
    p = get_profile(data_root=tmp_path, overrides={"filter": {"min_aesthetic": 6.0}, "sample": {"seeds": [5]}})
    assert p.name == "tiny" and p.filter.min_aesthetic == 6.0 and p.sample.seeds == (5,)
    assert p.latents_dir == tmp_path / "latents"
    assert Profile.sd15().unet.ch == 320
    with pytest.raises(ValueError, match="min_aesthetc"):
        p.with_overrides({"filter": {"min_aesthetc": 1}})
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        get_profile("nope")


def test_definitions_validate():
    dagster = Path(sys.executable).with_name("dagster")
    res = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_sd_cli_lists_commands():
    sd = Path(sys.executable).with_name("sd")
    res = subprocess.run([str(sd), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "generate" in res.stdout and "train" in res.stdout
