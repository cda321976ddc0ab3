"""The data assets end to end through Dagster, on the embedded synthetic source, with real img2dataset
downloading over real HTTP from the loopback server."""

import hashlib
import tarfile
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from sd_assets.assets.data import filtered_metadata, image_shards, laion_metadata
from sd_assets.resources import SDConfig
from sd_core.data.synthetic import read_manifest

# 120 rows → 86 pass the filters (synthetic.plant_counts) → two parts of 43 rows.
ROWS, SHARD = 120, 43


def _sd(root: Path, **source) -> SDConfig:
    return SDConfig(profile="tiny", data_root=str(root), overrides={
        "source": {"synthetic_rows": ROWS, **source},
        "download": {"shard_size": SHARD, "thread_count": 4, "timeout_s": 20},
    })


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


def _error_text(result) -> str:
    """Every message in the failed step's error chain (Dagster wraps the asset's exception)."""
    err, parts = result.get_step_failure_events()[0].event_specific_data.error, []
    while err is not None:
        parts.append(err.message)
        err = err.cause
    return "\n".join(parts)


def _tar_payload(path: Path) -> dict[str, bytes]:
    """Image and caption bytes per member (the json holds the loopback port, which differs per run)."""
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if not m.name.endswith(".json")}


def test_synthetic_metadata_filter_and_shards_end_to_end(tmp_path):
    root = tmp_path / "data"
    sd = _sd(root)
    with dg.instance_for_test() as instance:
        res = dg.materialize([laion_metadata, filtered_metadata], instance=instance, resources={"sd": sd})
        assert res.success

        meta = res.asset_materializations_for_node("laion_metadata")[0].metadata
        assert meta["rows"].value == ROWS and meta["num_files"].value == 1 and meta["bytes"].value > 0
        assert "url" in meta["column_mapping"].value and "URL" in meta["column_mapping"].value
        manifest = read_manifest(root / "metadata" / "synthetic.parquet")

        # The funnel equals the planted counts exactly, stage by stage.
        fm = res.asset_materializations_for_node("filtered_metadata")[0].metadata
        assert fm["removed_by"].value == {**manifest["planted"], "already_sharded": 0}
        assert fm["rows_in"].value == ROWS and fm["rows_out"].value == manifest["rows_out"] == 2 * SHARD
        assert "| min_aesthetic |" in fm["funnel"].value
        checks = res.get_asset_check_evaluations()
        assert [(c.check_name, c.passed) for c in checks] == [("thresholds_hold", True)]
        keys = instance.get_dynamic_partitions("shards")
        assert keys == ["00000", "00001"]

        # Both shards downloaded by img2dataset over HTTP; broken rows are counted, not fatal.
        reports = {}
        for key in keys:
            r = dg.materialize([image_shards], partition_key=key, instance=instance, resources={"sd": sd})
            assert r.success
            reports[key] = r.asset_materializations_for_node("image_shards")[0].metadata
        successes = sum(m["successes"].value for m in reports.values())
        failed_dl = sum(m["failed_to_download"].value for m in reports.values())
        failed_decode = sum(m["failed_to_resize"].value for m in reports.values())
        assert (successes, failed_dl, failed_decode) == (manifest["good"], manifest["missing"], manifest["corrupt"])
        reasons: dict[str, int] = {}
        for m in reports.values():
            for reason, n in m["failures_by_reason"].value.items():
                reasons[reason] = reasons.get(reason, 0) + n
        assert reasons.get("HTTP Error 404: Not Found") == manifest["missing"], reasons
        shards_dir = root / "shards"
        for key in keys:
            assert {f"{key}.tar", f"{key}.parquet", f"{key}_stats.json"} <= {p.name for p in shards_dir.iterdir()}
            with tarfile.open(shards_dir / f"{key}.tar") as tf:
                names = tf.getnames()
            assert sum(n.endswith(".jpg") for n in names) == reports[key]["successes"].value
            assert reports[key]["bytes"].value == (shards_dir / f"{key}.tar").stat().st_size
        assert not [p for p in shards_dir.iterdir() if p.name.startswith(".tmp")]

        # Re-running a partition is idempotent: same files, same images and captions, no leftovers.
        before_payload = _tar_payload(shards_dir / "00001.tar")
        before_files = sorted(p.name for p in shards_dir.iterdir())
        before_other = _digests(shards_dir)["00000.tar"]
        r = dg.materialize([image_shards], partition_key="00001", instance=instance, resources={"sd": sd})
        assert r.success
        assert sorted(p.name for p in shards_dir.iterdir()) == before_files
        assert _tar_payload(shards_dir / "00001.tar") == before_payload
        assert _digests(shards_dir)["00000.tar"] == before_other
        status = pq.read_table(shards_dir / "00001.parquet", columns=["status"]).column("status").to_pylist()
        assert status.count("success") == reports["00001"]["successes"].value

        # Re-materialising the metadata with the same source adds nothing and changes nothing.
        filtered_before = _digests(root / "filtered")
        res = dg.materialize([laion_metadata, filtered_metadata], instance=instance, resources={"sd": sd})
        fm = res.asset_materializations_for_node("filtered_metadata")[0].metadata
        assert fm["new_shards"].value == [] and fm["removed_by"].value["already_sharded"] == 2 * SHARD
        assert _digests(root / "filtered") == {**filtered_before, "_filter.json": _digests(root / "filtered")["_filter.json"]}
        assert instance.get_dynamic_partitions("shards") == keys

        # A bad source fails with a message naming the file, and damages nothing already written.
        (tmp_path / "notes.parquet").write_text("this is not parquet")
        metadata_before, filtered_before = _digests(root / "metadata"), _digests(root / "filtered")
        bad = SDConfig(profile="tiny", data_root=str(root),
                       overrides={"source": {"kind": "parquet", "uri": str(tmp_path / "notes.parquet")}})
        r = dg.materialize([laion_metadata], instance=instance, resources={"sd": bad}, raise_on_error=False)
        assert not r.success
        err = _error_text(r)
        assert f"{tmp_path / 'notes.parquet'} is not a readable parquet file" in err, err
        assert _digests(root / "metadata") == metadata_before and _digests(root / "filtered") == filtered_before


def test_image_shards_without_a_part_fails_clearly(tmp_path):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00007"])
        r = dg.materialize([image_shards], partition_key="00007", instance=instance,
                           resources={"sd": _sd(tmp_path / "data")}, raise_on_error=False)
        assert not r.success
        msg = _error_text(r)
        assert "00007" in msg and "does not exist" in msg
