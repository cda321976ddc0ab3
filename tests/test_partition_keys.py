"""Hostile shard partition keys and key-derived paths outside the data root (issue 11), written as the attack.

Anyone with the Dagster instance can register any string as a `shards` partition
(``instance.add_dynamic_partitions``); the per-shard assets splice the key into file names. The issue's key
``../../elsewhere/filtered/00000`` made `latents` read a tar of *another* data root, write its temporaries
there, leave them, and commit a manifest entry with no files behind it — after which `sd train` failed for the
whole data root. Here the same keys (and worse) are registered on a real instance, next to a real tar and
filtered part outside the data root that the key points at, and the assets must refuse them with a message
before touching any file: nothing new anywhere, the manifest byte-identical, `sd train` still trains.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from latents_support import write_synthetic_tar
from sd_assets.assets.data import filtered_metadata, image_shards, laion_metadata
from sd_assets.assets.latents import latents
from sd_assets.resources import SDConfig
from sd_core import cli
from sd_core.config import FilterConfig, Profile
from sd_core.data import filter as data_filter
from sd_core.data.shards import download_shard
from sd_core.data.synthetic import generate_synthetic
from sd_core.encoding.encode import encode_shard
from sd_core.encoding.latent_cache import LatentDataset, read_manifest, write_shard
from sd_core.paths import KEY_WIDTH, check_shard_key, inside_data_root, shard_file
from train_support import SMALL_UNET, make_tiny_data, train_argv
from dagster_support import step_error_text

# The issue's key first, then the other ways out of (or around) the key format.
ISSUE_KEY = "../../elsewhere/filtered/00000"
HOSTILE = [
    ISSUE_KEY,
    "/abs/path",
    "00000/../../x",
    "",
    "a b",
    "0" * 300,
    "00000\n",  # `$` matches before a final newline: a match()+`$` check lets this through
    "\uff10" * 5,  # fullwidth digits: `\d` matches them, int() parses them
    "\u0660\u0660\u0660\u0660\u0661",  # Arabic-Indic digits
    "0000\u041e",  # Cyrillic capital O for the last zero
    "00000\u200b",  # a zero-width space after a valid key
    "000001",  # digits, but not a name the filter writes (non-canonical zero padding)
]
IDS = [ascii(k)[:24] for k in HOSTILE]
REFUSED = "is not a valid shard key"


# ---------------------------------------------------------------------------------------------- helpers
def _tree(base: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``base`` (symlinks not followed) → (mode, size, mtime_ns). Directory mtimes change
    when an entry is created or removed inside, so a temporary made and deleted again is seen too."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            st = (Path(dirpath) / name).lstat()
            out[str((Path(dirpath) / name).relative_to(base))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out




def _materialize(asset: dg.AssetsDefinition, key: str, instance: dg.DagsterInstance,
                 root: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize([asset], partition_key=key, instance=instance, raise_on_error=False,
                          resources={"sd": SDConfig(profile="tiny", data_root=str(root))})


def _filtered_parts(out_dir: Path, seed: int = 0) -> list[str]:
    """Real filter output (`sd_core.data.filter`) in ``out_dir``: parts 00000, 00001, ..."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generate_synthetic(out_dir.parent / f"meta-{seed}.parquet", rows=60, seed=seed)
    report = data_filter.filter_metadata([out_dir.parent / f"meta-{seed}.parquet"], out_dir,
                                         FilterConfig(min_side=64), shard_size=20)
    return report.shard_keys


@dataclass
class Attack:
    """A data root with a trainable latent cache (shards 00000, 00001) beside a folder ``elsewhere`` holding a
    real filtered part and shard tar at exactly where the issue's key points from ``filtered/`` and ``shards/``
    (``data/shards/../../elsewhere/filtered/00000.tar``); every hostile key registered on a real instance."""

    base: Path  # the data root's parent: inside and outside the data root
    profile: Profile
    instance: dg.DagsterInstance

    @property
    def root(self) -> Path:
        return self.profile.data_root

    @property
    def manifest(self) -> Path:
        return self.profile.latents_dir / "manifest.json"


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    base = tmp_path_factory.mktemp("hostile-keys")
    profile = Profile.tiny(base / "data").with_overrides(SMALL_UNET)
    make_tiny_data(profile)
    elsewhere = base / "elsewhere" / "filtered"
    assert _filtered_parts(elsewhere)[0] == "00000"
    write_synthetic_tar(elsewhere / "00000.tar", n=4)
    # the paths the issue's key builds really lead to these files: without the check, the assets would use them
    assert (profile.shards_dir / f"{ISSUE_KEY}.tar").resolve() == (elsewhere / "00000.tar").resolve()
    assert (profile.filtered_dir / f"{ISSUE_KEY}.parquet").resolve() == (elsewhere / "00000.parquet").resolve()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", HOSTILE)
        assert set(instance.get_dynamic_partitions("shards")) == set(HOSTILE)  # Dagster itself accepts them all
        yield Attack(base, profile, instance)


# ---------------------------------------------------------------------------------------- the key format
def test_the_key_format_is_exactly_the_filters_part_names():
    assert KEY_WIDTH == data_filter.KEY_WIDTH
    for n in (0, 1, 42, 99_999, 100_000, 123_456, 10**11):
        assert check_shard_key(data_filter.shard_key(n)) == data_filter.shard_key(n)


@pytest.mark.parametrize("key", HOSTILE, ids=IDS)
def test_check_shard_key_refuses_naming_the_key_and_the_pattern(key):
    with pytest.raises(ValueError, match=REFUSED) as e:
        check_shard_key(key)
    msg = str(e.value)
    assert ascii(key)[:40] in msg and "[0-9]{5}" in msg  # the key, escaped (a newline or look-alike shows)
    assert len(msg) < 400  # a 300-character key does not flood the log


# -------------------------------------------------------------------------- the assets, through Dagster
# Both assets read their key through the same check (`sd_assets.partitions.shard_partition_key`): `latents` gets
# every hostile key, `image_shards` one of each kind (a run costs ~1 s, and the machine is shared).
IMAGE_SHARDS_KEYS = [ISSUE_KEY, "/abs/path", "", "0" * 300, "00000\n", "\uff10" * 5]
CASES = [(latents, k) for k in HOSTILE] + [(image_shards, k) for k in IMAGE_SHARDS_KEYS]


@pytest.mark.parametrize(("asset", "key"), CASES, ids=[f"{a.key.path[-1]}-{ascii(k)[:24]}" for a, k in CASES])
def test_a_hostile_partition_fails_before_touching_any_file(attack, asset, key):
    before, manifest = _tree(attack.base), attack.manifest.read_bytes()
    result = _materialize(asset, key, attack.instance, attack.root)
    assert not result.success
    text = step_error_text(result)
    assert REFUSED in text and ascii(key)[:40] in text and "Nothing was read or written" in text
    assert _tree(attack.base) == before  # nothing new, changed or removed, inside or outside the data root
    assert attack.manifest.read_bytes() == manifest
    assert list(read_manifest(attack.profile.latents_dir)) == ["00000", "00001"]
    assert not attack.instance.get_materialized_partitions(asset.key)


def test_sd_train_still_trains_on_the_data_root_after_the_attack(attack, tmp_path, capsys):
    failed = _materialize(latents, ISSUE_KEY, attack.instance, attack.root)
    assert not failed.success and REFUSED in step_error_text(failed)
    ds = LatentDataset(attack.profile.latents_dir)  # every shard opens and validates against the manifest
    assert ds.shards == ["00000", "00001"] and len(ds) == 96
    out = tmp_path / "run"
    argv = train_argv(attack.profile, out, "--overrides", json.dumps(SMALL_UNET), max_steps=2, checkpoint_every=2,
                      val_every=2, val_max_samples=4)
    assert cli.main(["train", *argv]) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------- symlinks out of the data root
@pytest.fixture
def root_with_cache(tmp_path: Path) -> Path:
    """A data root whose latent cache holds shard 00000 (small arrays through `write_shard`)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_shard(root / "latents", "00000", rng.standard_normal((3, 4, 8, 8)), ["a", "b", "c"], ["x", "y", "z"],
                rng.integers(0, 50, (3, 6)))
    return root


def test_latents_refuses_a_cache_file_symlinked_outside(root_with_cache, tmp_path):
    root = root_with_cache
    write_synthetic_tar(root / "shards" / "00002.tar", n=3)
    victim = tmp_path / "outside" / "victim.npy"
    victim.parent.mkdir()
    victim.write_bytes(b"someone else's file")
    (root / "latents" / "00002.tokens.npy").symlink_to(victim)
    before, manifest = _tree(tmp_path), (root / "latents" / "manifest.json").read_bytes()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00002"])
        result = _materialize(latents, "00002", instance, root)
    assert not result.success
    text = step_error_text(result)
    assert "is outside" in text and "00002.tokens.npy" in text and str(victim.resolve()) in text
    assert _tree(tmp_path) == before and victim.read_bytes() == b"someone else's file"
    assert (root / "latents" / "manifest.json").read_bytes() == manifest


def test_image_shards_refuses_a_shards_folder_symlinked_outside(tmp_path):
    root = tmp_path / "data"
    assert _filtered_parts(root / "filtered")[0] == "00000"
    outside = tmp_path / "other-disk"
    outside.mkdir()
    (root / "shards").symlink_to(outside, target_is_directory=True)
    before = _tree(tmp_path)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00000"])
        result = _materialize(image_shards, "00000", instance, root)
    assert not result.success
    text = step_error_text(result)
    assert "outside the data root" in text and str(root.resolve()) in text
    assert _tree(tmp_path) == before and not list(outside.iterdir())


def test_write_shard_refuses_a_symlinked_target_and_leaves_no_temporaries(root_with_cache, tmp_path):
    cache = root_with_cache / "latents"
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache / "00003.npy").symlink_to(outside / "00003.npy")  # dangling: the write would create it out there
    before, manifest = _tree(tmp_path), (cache / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="is outside its folder") as e:
        write_shard(cache, "00003", np.zeros((1, 4, 8, 8)), ["k"], ["c"], np.zeros((1, 6), int))
    assert "00003.npy" in str(e.value) and str(cache.resolve()) in str(e.value)
    assert _tree(tmp_path) == before and (cache / "manifest.json").read_bytes() == manifest


# ------------------------------------------------------------- the library's writers, called directly
LIBRARY_HOSTILE = ["../x", "../../elsewhere/filtered/00000", "/abs/path", "a/b", "", ".", "..", "x\n", "x\x00y",
                   "x" * 300]


@pytest.mark.parametrize("name", LIBRARY_HOSTILE, ids=[ascii(n)[:20] for n in LIBRARY_HOSTILE])
def test_the_writers_refuse_a_name_that_leaves_their_folder(tmp_path, name):
    """`write_shard`, `encode_shard` and `download_shard` take free-form names (tests use "s0"), so they check
    only what keeps them inside their folder — and do so before creating anything."""
    profile = Profile.tiny(tmp_path / "data")
    part = tmp_path / "part.parquet"
    part.write_bytes(b"never read")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="cannot be used in a file name"):
        write_shard(profile.latents_dir, name, np.zeros((1, 4, 8, 8)), ["k"], ["c"], np.zeros((1, 6), int))
    with pytest.raises(ValueError, match="cannot be used in a file name"):
        encode_shard(tmp_path / "no-such.tar", profile.latents_dir, name, profile)  # refused before the tar
    with pytest.raises(ValueError, match="cannot be used in a file name"):
        download_shard(part, profile.shards_dir, name, profile.download)
    assert _tree(tmp_path) == before  # not even the cache or shards folder was created


def test_inside_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "latents").mkdir(parents=True)
    assert inside_data_root(root / "latents" / "00000.npy", root) == (root / "latents" / "00000.npy").resolve()
    with pytest.raises(ValueError, match="outside the data root") as e:
        inside_data_root(root / "latents" / ".." / ".." / "x", root)
    assert str(root.resolve()) in str(e.value) and str((tmp_path / "x").resolve()) in str(e.value)
    # a data root that is itself a symlink (data on another disk) is fine
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    assert inside_data_root(tmp_path / "link" / "latents" / "a.npy", tmp_path / "link").parent == \
        (root / "latents").resolve()
    # a symlink loop is a clear refusal, not a RuntimeError
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(ValueError, match="cannot resolve"):
        inside_data_root(root / "loop" / "x", root)
    # free-form names still work where the library takes them
    assert shard_file(root / "latents", "s0", ".npy") == root / "latents" / "s0.npy"


# ------------------------------------------------------------------ registration by filtered_metadata
def test_filtered_metadata_never_registers_a_part_whose_name_is_not_a_key(tmp_path):
    """A file in ``filtered/`` that the filter's own glob matches (``\\d{5,}`` also matches other scripts'
    digits) but that is not a key the filter writes: logged, never registered."""
    root = tmp_path / "data"
    donor = tmp_path / "donor" / "filtered"
    _filtered_parts(donor, seed=7)
    (root / "filtered").mkdir(parents=True)
    odd = ["\u0660\u0660\u0660\u0660\u0667", "\uff10\uff10\uff10\uff10\uff18", "000009"]
    for name in odd:
        shutil.copy(donor / "00000.parquet", root / "filtered" / f"{name}.parquet")
    sd = SDConfig(profile="tiny", data_root=str(root), overrides={"source": {"synthetic_rows": 120},
                                                                   "download": {"shard_size": 50}})
    with dg.instance_for_test() as instance:
        result = dg.materialize([laion_metadata, filtered_metadata], instance=instance, resources={"sd": sd})
        assert result.success
        keys = instance.get_dynamic_partitions("shards")
        assert keys and all(check_shard_key(k) == k for k in keys) and not set(odd) & set(keys)
        warnings = [e.message for e in instance.all_logs(result.run_id) if "not registering" in (e.message or "")]
    assert len(warnings) == len(odd)
    for name in odd:
        assert any(ascii(name) in w for w in warnings), (name, warnings)
