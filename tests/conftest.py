"""Shared test fixtures. Tests run offline, on CPU, against real components (no mocks).

Test modules import the support modules next to them by their bare names (``from latents_support import
...``): there is no ``tests/__init__.py``, so pytest puts this folder on ``sys.path`` however it is started.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

# Set before anything imports img2dataset / wandb / hub clients.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from latents_support import OVERRIDES  # noqa: E402
from sd_core.config import Profile  # noqa: E402


@contextlib.contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Tiny models run their many small ops fastest on one intra-op thread: with two, OpenMP workers spinning
    against other processes on a shared 2-core machine made the UNet overfit test 10x slower (175 s, not 13 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The test runs on one torch thread (a whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with _single_torch_thread():
        yield


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A fresh, empty data root for one test."""
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def tiny_profile() -> Callable[[Path], Profile]:
    """``tiny_profile(root)``: the tiny profile rooted at ``root`` (`latents_support.OVERRIDES`: none, so its VAE
    is the shipped fit). A factory, so that module- and class-scoped fixtures can use it too."""

    def make(root: Path) -> Profile:
        return Profile.tiny(root).with_overrides(OVERRIDES)

    return make


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory: pytest.TempPathFactory, tiny_profile: Callable[[Path], Profile]) -> Path:
    """The tiny components (tokenizer, text encoder, the shipped VAE fit), built once per test session; a test copies
    them into its own data root with `latents_support.install_components`, where `build_tiny_components`
    recognises them as current instead of fitting again."""
    from sd_core.encoding.components import build_tiny_components

    p = tiny_profile(tmp_path_factory.getbasetemp() / "latents-tiny" / "data")
    with _single_torch_thread():  # the least CPU time on a shared, busy 2-core machine
        build_tiny_components(p, log=None)
    return p.components_dir


# The slowest test files, slowest first (seconds each, summed from `make test`'s junit report on a 2-core AMD EPYC
# Zen 5, 2026-12-07, after the code location and the downloader stopped importing torch: demo 112 (its fixture is
# the whole demo-fast graph), multinode 52 (torchrun launches), shards 48, training_asset 45, cli_backfill 40,
# data_assets 32, bench_gpu 32, recipe_flags 30 (its compiled run is `slow`), evaluation_asset 26, latents_asset 22,
# encode 18, components 17). `make test` runs with `--dist loadfile --no-loadscope-reorder`, so xdist hands files
# out in this order: the long ones start at once instead of becoming the run's tail (longest-first scheduling).
SLOWEST_FILES_FIRST = [
    "test_demo.py", "test_multinode.py", "test_shards.py", "test_training_asset.py", "test_cli_backfill.py",
    "test_data_assets.py", "test_bench_gpu.py", "test_recipe_flags.py", "test_evaluation_asset.py",
    "test_latents_asset.py", "test_encode.py", "test_components.py",
]


def pytest_collection_modifyitems(config, items) -> None:
    """Run the slowest files first (stable sort: every file keeps its own test order)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
