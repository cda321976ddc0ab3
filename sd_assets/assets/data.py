"""Data assets: ``laion_metadata`` → ``filtered_metadata`` → ``image_shards[shard]``.

Thin wiring over `sd_core.data` (metadata sources, the DuckDB filter, img2dataset shards); every number comes
from the selected `sd_core.config.Profile` (the ``sd`` resource).
"""

from contextlib import nullcontext
from pathlib import Path

import dagster as dg

from sd_assets.partitions import refuse_writes_outside, registrable_shards, shard_input, shard_partition_key, shards
from sd_assets.resources import SDConfig, settings_read
from sd_core.data.filter import check_parts, existing_parts, filter_metadata, parts_version
from sd_core.data.image_server import ImageServer
from sd_core.data.metadata import fetch_source, files_version
from sd_core.data.shards import download_shard, shard_paths
from sd_core.data.synthetic import RENDER_VERSION, generate_synthetic, served_by_synthetic_server


def _register_shards(context: dg.AssetExecutionContext, keys: list[str]) -> list[str]:
    """Add the shard keys that are not yet partitions of ``shards``; return the ones added. A part whose name
    is not a shard key is logged and never registered (its runs would build paths from it)."""
    new, refused = registrable_shards(context.instance, keys)
    for why in refused.values():
        context.log.warning(f"not registering a shard part: {why}")
    if new:
        context.instance.add_dynamic_partitions(shards.name, new)
    return new


@dg.asset(
    group_name="metadata",
    code_version="1",
    metadata=settings_read("source"),
    kinds={"parquet"},
    description="The source's LAION metadata parquet files, brought into {data_root}/metadata/ and checked: "
                "the embedded synthetic source (default), a parquet path/glob/URL, or a Hugging Face dataset.",
)
def laion_metadata(context: dg.AssetExecutionContext, sd: SDConfig) -> dg.MaterializeResult:
    p = sd.get()
    src = p.source

    def write_synthetic(dest: Path) -> dict:
        return generate_synthetic(dest, rows=src.synthetic_rows, seed=src.synthetic_seed,
                                  image_size=src.synthetic_image_size, filter_config=p.filter).to_json()

    res = fetch_source(src, p.filter, p.metadata_dir, p.data_root / ".cache" / "hf", synthetic_writer=write_synthetic)
    for old in res.removed:
        context.log.info(f"removed {old.name}: no longer part of the configured source")
    metadata: dict[str, dg.RawMetadataValue] = {
        "source": f"{src.kind}: {src.uri or 'embedded synthetic shapes'}",
        **res.as_metadata(),
        "schema": dg.MetadataValue.md("```\n" + res.schema + "\n```"),
        "column_mapping": dg.MetadataValue.md(res.column_mapping_markdown()),
        "path": dg.MetadataValue.path(str(p.metadata_dir)),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(files_version(res.files)))


@dg.asset(
    group_name="metadata",
    deps=[laion_metadata],
    code_version="2",  # 2: the url_policy funnel stage
    metadata=settings_read("filter", "download.shard_size"),  # it cuts the parts: rows that are new to it
    kinds={"duckdb", "parquet"},
    check_specs=[dg.AssetCheckSpec(
        "thresholds_hold", asset="filtered_metadata",
        description="Every row of every shard part satisfies every configured filter; no URL appears twice.")],
    description="laion_metadata filtered by the configured quality thresholds (one streaming DuckDB query), "
                "rid of URLs that are not http(s) to a public host (the url_policy stage), de-duplicated by URL "
                "and cut into fixed-size shard parts {data_root}/filtered/{shard}.parquet; "
                "new shard keys are registered as `shards` partitions. Existing parts never change.",
)
def filtered_metadata(context: dg.AssetExecutionContext, sd: SDConfig) -> dg.MaterializeResult:
    p = sd.get()
    inputs = sorted(p.metadata_dir.glob("*.parquet"))
    report = filter_metadata(inputs, p.filtered_dir, p.filter, p.download.shard_size)
    parts = existing_parts(p.filtered_dir)
    added = _register_shards(context, list(parts))
    context.log.info(f"{report.rows_in:,} rows in, {report.rows_out:,} rows in {len(report.shard_keys)} new "
                     f"part(s) {report.shard_keys}; {len(added)} partition(s) registered")
    violations = check_parts(list(parts.values()), p.filter)
    return dg.MaterializeResult(
        metadata={
            "funnel": dg.MetadataValue.md(report.funnel_markdown()),
            **report.as_metadata(),
            "num_shards": len(parts),
            "registered_partitions": added,
            "path": dg.MetadataValue.path(str(p.filtered_dir)),
        },
        data_version=dg.DataVersion(parts_version(parts)),
        check_results=[dg.AssetCheckResult(
            check_name="thresholds_hold",
            passed=not any(violations.values()),
            metadata={"violations": violations, "parts_checked": len(parts)},
            description=None if not any(violations.values()) else
            "rows violating the current thresholds: parts written under looser settings stay as they are; "
            "re-filter into a fresh data root to apply tighter ones",
        )],
    )


@dg.asset(
    group_name="images",
    partitions_def=shards,
    deps=[filtered_metadata],
    # 2: downloads under the URL policy guard; the render suffix: the synthetic images' pixels changed
    code_version=f"2.render{RENDER_VERSION}",
    # how its images are stored, not the download's pacing (threads, timeouts, watchdog): that decides how fast,
    # not what. Which rows it holds is its shard part's, cut once by filtered_metadata and never changed
    metadata=settings_read("download.image_size", "download.resize_mode", "download.encode_quality"),
    kinds={"webdataset"},
    automation_condition=dg.AutomationCondition.on_missing(),
    description="One shard's images, downloaded by img2dataset (a subprocess in its own session, under a "
                "watchdog) into {data_root}/shards/{shard}.tar (+ .parquet, _stats.json). Failed URLs are "
                "counted by reason, never fatal; a shard with no image at all fails. Only http(s) to public "
                "addresses is fetched (filter.allow_hosts: the exceptions), redirects included; refusals are "
                "counted as refused_by_url_policy.",
)
def image_shards(context: dg.AssetExecutionContext, sd: SDConfig) -> dg.MaterializeResult:
    p = sd.get()
    key = shard_partition_key(context)
    refuse_writes_outside(key, p.data_root, lambda: [p.shards_dir, *shard_paths(p.shards_dir, key).values()])
    part = shard_input(key, p.filtered_dir / f"{key}.parquet", filtered_metadata)
    server = ImageServer() if served_by_synthetic_server(part) else nullcontext()
    with server as srv:
        if srv is not None:
            context.log.info(f"serving the synthetic images on {srv.base_url}")
        # The URL policy's exceptions: the configured ones, plus exactly this server for the synthetic source.
        allow = (*p.filter.allow_hosts, *([srv.authority] if srv is not None else []))
        report = download_shard(part, p.shards_dir, key, p.download,
                                rewrite=srv.rewrite if srv is not None else None, log=context.log.debug,
                                allow_hosts=allow)
    context.log.info(f"shard {key}: {report.successes}/{report.rows} images, failures {report.failures}")
    return dg.MaterializeResult(metadata={
        **report.as_metadata(),
        "failures": dg.MetadataValue.md(report.failures_markdown()),
        "tar": dg.MetadataValue.path(report.tar),
    })
