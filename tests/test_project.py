"""The project skeleton: config presets and the Dagster code location."""

import ast
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


def _modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code`` (None entries: blocked imports)."""
    heavy = ("torch", "diffusers", "transformers")
    probe = f"{code}\nimport sys; print(sorted(m for m in {heavy!r} if sys.modules.get(m)))"
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return ast.literal_eval(res.stdout.strip().splitlines()[-1])


def test_the_code_location_loads_without_torch():
    """Every `dagster` command, the webserver, the daemon and each run load the code location: the assets
    import torch's modules in their bodies (BENCHMARKS.md, session 17: 2.9 -> 1.3 s a load on a Zen 5)."""
    assert _modules_after("import sd_assets.definitions") == []


def test_img2dataset_imports_without_torch_in_the_downloaders_workers():
    """img2dataset's spawned workers run `sd_core.data.download_guard` as ``__mp_main__`` (its own process runs
    it as ``__main__``, the same line): img2dataset, its Downloader and webdataset import with torch kept out."""
    code = ("import runpy; runpy.run_module('sd_core.data.download_guard', run_name='__mp_main__')\n"
            "import img2dataset, webdataset\nfrom img2dataset.downloader import Downloader")
    assert _modules_after(code) == []


def test_sd_cli_lists_commands():
    sd = Path(sys.executable).with_name("sd")
    res = subprocess.run([str(sd), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "generate" in res.stdout and "train" in res.stdout
