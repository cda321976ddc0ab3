"""Sensors: the shard sensor (new shard parts on disk → partitions + runs). The automation-condition sensor
lives in `sd_assets.automation`."""

import dagster as dg

from sd_assets.jobs import shards_job
from sd_assets.partitions import shards, unregistered_shards
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


@dg.sensor(
    name="shard_sensor",
    job=shards_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers shard parts found in {data_root}/filtered/ that are not yet `shards` partitions (e.g. "
                "written by another process or restored from backup) and requests one image_shards run each. "
                "Stopped by default; `dagster sensor start -w workspace.yaml shard_sensor`.",
)
def shard_sensor(context: dg.SensorEvaluationContext, sd: SDConfig):
    p = sd.get()
    parts = existing_parts(p.filtered_dir)
    new = unregistered_shards(context.instance, parts)
    if not new:
        return dg.SkipReason(f"no new shard parts in {p.filtered_dir} ({len(parts)} on disk, all registered)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=shard_run_key(k, parts[k])) for k in new],
        dynamic_partitions_requests=[shards.build_add_request(new)],
    )


sensors: list[dg.SensorDefinition] = [shard_sensor]
