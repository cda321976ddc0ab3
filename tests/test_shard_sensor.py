"""The shard sensor: shard parts on disk that are not partitions yet → partitions added, one run each, once;
parts whose names are not shard keys are skipped with a reason."""

import shutil

import dagster as dg

from sd_assets.definitions import defs
from sd_assets.resources import SDConfig
from sd_assets.sensors import SHARD_SENSOR_VERSION, shard_sensor
from sd_core.config import FilterConfig
from sd_core.data.filter import filter_metadata
from sd_core.data.synthetic import generate_synthetic


def _tick(instance, sd, cursor=None):
    # `with`: the context's Dagster context managers close here, not at a later GC (tests/test_latents_asset.py)
    with dg.build_sensor_context(instance=instance, resources={"sd": sd}, cursor=cursor) as ctx:
        result = shard_sensor(ctx)
    if isinstance(result, dg.SensorResult):
        # build_sensor_context does not apply partition requests; the daemon does, before the run requests.
        for req in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def test_new_shard_on_disk_is_registered_and_requested_exactly_once(tmp_path):
    root = tmp_path / "data"
    sd = SDConfig(profile="tiny", data_root=str(root))
    cfg = FilterConfig(min_side=64)
    assert defs.resolve_sensor_def("shard_sensor").default_status == dg.DefaultSensorStatus.STOPPED
    with dg.instance_for_test() as instance:
        assert isinstance(_tick(instance, sd), dg.SkipReason)  # nothing on disk yet

        generate_synthetic(tmp_path / "m1.parquet", rows=120, seed=1)
        report = filter_metadata([tmp_path / "m1.parquet"], root / "filtered", cfg, shard_size=50)
        assert report.shard_keys == ["00000", "00001"]
        result = _tick(instance, sd)
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["00000", "00001"]
        assert all(r.run_key.endswith(f":v{SHARD_SENSOR_VERSION}") for r in result.run_requests)
        assert len({r.run_key for r in result.run_requests}) == 2
        assert result.dynamic_partitions_requests[0].partitions_def_name == "shards"
        assert instance.get_dynamic_partitions("shards") == ["00000", "00001"]

        # Next tick: nothing new → no request.
        assert isinstance(_tick(instance, sd), dg.SkipReason)

        # One more shard appears (new metadata): exactly one partition and one run.
        generate_synthetic(tmp_path / "m2.parquet", rows=80, seed=2,
                           base_url="http://other.sd-pipeline.invalid")
        report = filter_metadata([tmp_path / "m1.parquet", tmp_path / "m2.parquet"], root / "filtered", cfg,
                                 shard_size=100)
        assert report.shard_keys == ["00002"]
        result = _tick(instance, sd)
        assert [r.partition_key for r in result.run_requests] == ["00002"]
        assert instance.get_dynamic_partitions("shards") == ["00000", "00001", "00002"]
        assert isinstance(_tick(instance, sd), dg.SkipReason)

        # The requests target the image download job, which accepts these partitions.
        job = defs.resolve_job_def("shards_job")
        assert result.run_requests[0].job_name in (None, job.name)


def test_part_files_whose_names_are_not_shard_keys_are_skipped_with_a_reason(tmp_path):
    """``filtered/`` holds a real part and copies of it under names the filter never writes but its glob
    (``\\d{5,}``) matches: other scripts' digits and a non-canonical zero padding. Only the real key becomes a
    partition (and a run); the others are named in the skip reason, every tick, and never registered."""
    root = tmp_path / "data"
    sd = SDConfig(profile="tiny", data_root=str(root))
    generate_synthetic(tmp_path / "m1.parquet", rows=60, seed=1)
    report = filter_metadata([tmp_path / "m1.parquet"], root / "filtered", FilterConfig(min_side=64), shard_size=50)
    assert report.shard_keys == ["00000"]
    odd = ["\u0660\u0660\u0660\u0660\u0661", "\uff10\uff10\uff10\uff10\uff12", "000003"]
    for name in odd:
        shutil.copy(root / "filtered" / "00000.parquet", root / "filtered" / f"{name}.parquet")
    with dg.instance_for_test() as instance:
        result = _tick(instance, sd)
        assert [r.partition_key for r in result.run_requests] == ["00000"]
        assert instance.get_dynamic_partitions("shards") == ["00000"]

        skip = _tick(instance, sd)
        assert isinstance(skip, dg.SkipReason)
        assert "3 refused, not registered" in skip.skip_message
        for name in odd:
            assert ascii(name) in skip.skip_message and "is not a valid shard key" in skip.skip_message
        assert instance.get_dynamic_partitions("shards") == ["00000"]
