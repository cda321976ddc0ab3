"""Sensors: the shard sensor (new shard parts on disk → partitions + runs). The automation-condition sensor
lives in `sd_assets.automation`."""

from pathlib import Path

import dagster as dg

from sd_assets.jobs import shards_job
from sd_assets.partitions import registrable_shards, shards
from sd_assets.resources import SDConfig
from sd_core.data.filter import existing_parts

# Part of every run key: bump it to request the runs again for shards this sensor has already requested
# (a sensor never reuses a run_key, so a re-run with an unchanged key would be skipped silently).
SHARD_SENSOR_VERSION = 1


def shard_run_key(key: str, part) -> str:
    """Run key of one shard's download: the key, the part's size and mtime (a part re-created under the same key
    after a clean gets a new run) and `SHARD_SENSOR_VERSION`."""
    st = part.stat()
    return f"image_shards:{key}:{st.st_size}-{st.st_mtime_ns}:v{SHARD_SENSOR_VERSION}"


def _nothing_new(filtered_dir: Path, on_disk: int, refused: dict[str, str]) -> dg.SkipReason:
    """Why the tick requests nothing; refused part names are repeated here (the skip reason is what the UI's
    sensor page shows) so that an oddly named file in ``filtered/`` is seen, not silently ignored."""
    if not refused:
        return dg.SkipReason(f"no new shard parts in {filtered_dir} ({on_disk} on disk, all registered)")
    return dg.SkipReason(f"no new shard parts in {filtered_dir} ({on_disk} on disk; {len(refused)} refused, not "
                         f"registered: {'; '.join(refused.values())})")


@dg.sensor(
    name="shard_sensor",
    job=shards_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers shard parts found in {data_root}/filtered/ that are not yet `shards` partitions (e.g. "
                "written by another process or restored from backup) and requests one image_shards run each; a "
                "part whose name is not a shard key (sd_core.paths.check_shard_key) is logged and skipped. "
                "Stopped by default; `dagster sensor start -w workspace.yaml shard_sensor`.",
)
def shard_sensor(context: dg.SensorEvaluationContext, sd: SDConfig):
    p = sd.get()
    parts = existing_parts(p.filtered_dir)
    new, refused = registrable_shards(context.instance, parts)
    for key, why in refused.items():  # a part file with an odd name never becomes a partition (see partitions.py)
        context.log.warning(f"not registering {parts[key]}: {why}")
    if not new:
        return _nothing_new(p.filtered_dir, len(parts), refused)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=shard_run_key(k, parts[k])) for k in new],
        dynamic_partitions_requests=[shards.build_add_request(new)],
    )


sensors: list[dg.SensorDefinition] = [shard_sensor]
