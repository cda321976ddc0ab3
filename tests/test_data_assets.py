"""The data assets end to end through Dagster, on the embedded synthetic source, with real img2dataset
downloading over real HTTP from the loopback server."""

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from sd_assets.assets.data import filtered_metadata, image_shards, laion_metadata
from sd_assets.resources import SDConfig
from sd_core.data.synthetic import read_manifest
from dagster_support import step_error_text

# 120 rows → 86 pass the filters (synthetic.plant_counts) → two parts of 43 rows.
ROWS, SHARD = 120, 43


def _sd(root: Path, **source) -> SDConfig:
    return SDConfig(profile="tiny", data_root=str(root), overrides={
        "source": {"synthetic_rows": ROWS, **source},
        "download": {"shard_size": SHARD, "thread_count": 4, "timeout_s": 20},
    })


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}




def _tar_payload(path: Path) -> dict[str, bytes]:
    """Image and caption bytes per member (the json holds the loopback port, which differs per run)."""
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if not m.name.endswith(".json")}


@dataclass
class Downloaded:
    """One instance in which the synthetic source was fetched, filtered into shard parts, and every shard
    downloaded once."""

    base: Path  # the data root's parent: room for files that are not part of the pipeline
    root: Path
    sd: SDConfig
    instance: dg.DagsterInstance
    first: Any  # the run that materialised laion_metadata and filtered_metadata
    reports: dict[str, Any]  # shard -> the metadata of its image_shards materialisation
    manifest: dict[str, Any]  # what the synthetic source planted

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Iterator[Downloaded]:
    """Shared by the tests below (downloading is what costs): each leaves the files as it found them."""
    base = tmp_path_factory.mktemp("data-assets")
    root = base / "data"
    sd = _sd(root)
    with dg.instance_for_test() as instance:
        first = dg.materialize([laion_metadata, filtered_metadata], instance=instance, resources={"sd": sd})
        assert first.success
        reports = {}
        for key in instance.get_dynamic_partitions("shards"):
            r = dg.materialize([image_shards], partition_key=key, instance=instance, resources={"sd": sd})
            assert r.success
            reports[key] = r.asset_materializations_for_node("image_shards")[0].metadata
        manifest = read_manifest(root / "metadata" / "synthetic.parquet")
        yield Downloaded(base, root, sd, instance, first, reports, manifest)


def test_the_source_metadata_is_fetched_and_described(downloaded):
    meta = downloaded.first.asset_materializations_for_node("laion_metadata")[0].metadata
    assert meta["rows"].value == ROWS and meta["num_files"].value == 1 and meta["bytes"].value > 0
    assert "url" in meta["column_mapping"].value and "URL" in meta["column_mapping"].value


def test_the_filter_funnel_equals_the_planted_counts(downloaded):
    # stage by stage, exactly
    manifest = downloaded.manifest
    fm = downloaded.first.asset_materializations_for_node("filtered_metadata")[0].metadata
    assert fm["removed_by"].value == {**manifest["planted"], "url_policy": 0, "already_sharded": 0}
    assert fm["rows_in"].value == ROWS and fm["rows_out"].value == manifest["rows_out"] == 2 * SHARD
    assert "| min_aesthetic |" in fm["funnel"].value
    checks = downloaded.first.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("thresholds_hold", True)]


def test_the_filter_registers_one_partition_per_shard_part(downloaded):
    assert downloaded.instance.get_dynamic_partitions("shards") == ["00000", "00001"]


def test_shards_download_over_http_and_count_broken_rows(downloaded):
    # img2dataset over HTTP; broken rows are counted, not fatal
    reports, manifest = downloaded.reports, downloaded.manifest
    successes = sum(m["successes"].value for m in reports.values())
    failed_dl = sum(m["failed_to_download"].value for m in reports.values())
    failed_decode = sum(m["failed_to_resize"].value for m in reports.values())
    assert (successes, failed_dl, failed_decode) == (manifest["good"], manifest["missing"], manifest["corrupt"])
    reasons: dict[str, int] = {}
    for m in reports.values():
        for reason, n in m["failures_by_reason"].value.items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert reasons.get("HTTP Error 404: Not Found") == manifest["missing"], reasons


def test_each_shard_is_written_whole(downloaded):
    shards_dir = downloaded.shards_dir
    for key, report in downloaded.reports.items():
        assert {f"{key}.tar", f"{key}.parquet", f"{key}_stats.json"} <= {p.name for p in shards_dir.iterdir()}
        with tarfile.open(shards_dir / f"{key}.tar") as tf:
            names = tf.getnames()
        assert sum(n.endswith(".jpg") for n in names) == report["successes"].value
        assert report["bytes"].value == (shards_dir / f"{key}.tar").stat().st_size
    assert not [p for p in shards_dir.iterdir() if p.name.startswith(".tmp")]


def test_rerunning_a_partition_is_idempotent(downloaded):
    # same files, same images and captions, no leftovers
    shards_dir = downloaded.shards_dir
    before_payload = _tar_payload(shards_dir / "00001.tar")
    before_files = sorted(p.name for p in shards_dir.iterdir())
    before_other = _digests(shards_dir)["00000.tar"]
    r = dg.materialize([image_shards], partition_key="00001", instance=downloaded.instance,
                       resources={"sd": downloaded.sd})
    assert r.success
    assert sorted(p.name for p in shards_dir.iterdir()) == before_files
    assert _tar_payload(shards_dir / "00001.tar") == before_payload
    assert _digests(shards_dir)["00000.tar"] == before_other
    status = pq.read_table(shards_dir / "00001.parquet", columns=["status"]).column("status").to_pylist()
    assert status.count("success") == downloaded.reports["00001"]["successes"].value


def test_rematerialising_the_metadata_adds_and_changes_nothing(downloaded):
    root, instance = downloaded.root, downloaded.instance
    filtered_before = _digests(root / "filtered")
    res = dg.materialize([laion_metadata, filtered_metadata], instance=instance, resources={"sd": downloaded.sd})
    fm = res.asset_materializations_for_node("filtered_metadata")[0].metadata
    assert fm["new_shards"].value == [] and fm["removed_by"].value["already_sharded"] == 2 * SHARD
    assert _digests(root / "filtered") == {**filtered_before, "_filter.json": _digests(root / "filtered")["_filter.json"]}
    assert instance.get_dynamic_partitions("shards") == list(downloaded.reports)


def test_a_bad_source_fails_naming_the_file_and_damages_nothing(downloaded):
    root, notes = downloaded.root, downloaded.base / "notes.parquet"
    notes.write_text("this is not parquet")
    metadata_before, filtered_before = _digests(root / "metadata"), _digests(root / "filtered")
    bad = SDConfig(profile="tiny", data_root=str(root), overrides={"source": {"kind": "parquet", "uri": str(notes)}})
    r = dg.materialize([laion_metadata], instance=downloaded.instance, resources={"sd": bad}, raise_on_error=False)
    assert not r.success
    err = step_error_text(r)
    assert f"{notes} is not a readable parquet file" in err, err
    assert _digests(root / "metadata") == metadata_before and _digests(root / "filtered") == filtered_before


def test_image_shards_without_a_part_fails_clearly(tmp_path):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00007"])
        r = dg.materialize([image_shards], partition_key="00007", instance=instance,
                           resources={"sd": _sd(tmp_path / "data")}, raise_on_error=False)
        assert not r.success
        msg = step_error_text(r)
        assert "00007" in msg and "does not exist" in msg
