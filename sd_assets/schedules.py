"""Schedules: incremental re-encoding of missing or stale latent shards."""

import dagster as dg

from sd_assets.jobs import encode_job
from sd_assets.partitions import shards
from sd_assets.resources import SDConfig
from sd_core.encoding.latent_cache import read_manifest
from sd_core.encoding.versions import components_digest, latents_code_version, shard_status
from sd_core.paths import is_shard_key

# The statuses of runs that did not produce a materialisation; each one bumps the attempt number in the run
# key, so a failed re-encode is requested again on the next tick instead of being deduplicated forever.
_FAILED = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def latents_refresh_requests(context: dg.ScheduleEvaluationContext, sd: SDConfig) -> list[dg.RunRequest]:
    """One ``encode_job`` run request per shard partition whose images exist but whose latent cache is
    missing or stale (see `sd_core.encoding.versions.shard_status`): compared against the cache manifest,
    which records the encode version, the components digest and the source tar's identity per shard.

    Run keys are ``latents:{shard}:{encode version}:{components digest}:{attempt}``: a VAE change (new
    version) is never deduplicated against the earlier encode, and ``attempt`` (failed/cancelled runs of
    that partition so far) lets a failed encode be retried. Shards with a run in flight are left alone.
    """
    p = sd.get()
    manifest = read_manifest(p.latents_dir)
    digest = components_digest(p)
    version = latents_code_version(p)

    def partitions_of(statuses) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in context.instance.get_run_records(
                dg.RunsFilter(job_name=encode_job.name, statuses=statuses), limit=100_000):
            k = rec.dagster_run.tags.get("dagster/partition")
            if k is not None:
                out[k] = out.get(k, 0) + 1
        return out

    in_flight = partitions_of(_IN_FLIGHT)
    failed = None
    requests = []
    for key in context.instance.get_dynamic_partitions(shards.name):
        if not is_shard_key(key):  # a hostile key registered by hand: `latents` would refuse it every tick
            context.log.warning(f"latents_refresh: skipping partition {key!r}, not a shard key")
            continue
        tar = p.shards_dir / f"{key}.tar"
        if not tar.is_file() or key in in_flight:
            continue
        reason = shard_status(p, manifest.get(key), tar, digest)
        if reason is None:
            continue
        if failed is None:
            failed = partitions_of(_FAILED)
        requests.append(dg.RunRequest(
            run_key=f"latents:{key}:{version}:{digest or '-'}:{failed.get(key, 0)}",
            partition_key=key,
            tags={"sd/encode_reason": reason[:200], "sd/encode_version": version},
        ))
    return requests


@dg.schedule(
    name="latents_refresh",
    cron_schedule="*/15 * * * *",
    job=encode_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every 15 minutes: request encode_job runs for shards whose images exist but whose latents "
                "are missing or stale (encode version, VAE/text components or source tar changed since the "
                "cache was written). Start it with `dagster schedule start -w workspace.yaml latents_refresh`.",
)
def latents_refresh(context: dg.ScheduleEvaluationContext, sd: SDConfig):
    requests = latents_refresh_requests(context, sd)
    if not requests:
        return dg.SkipReason("every shard with images has current latents")
    context.log.info(f"requesting {len(requests)} latent encode run(s)")
    return requests


schedules: list[dg.ScheduleDefinition] = [latents_refresh]
