"""Data assets: ``laion_metadata`` → ``filtered_metadata`` → ``image_shards[shard]``.

Thin wiring over `sd_core.data` (metadata sources, the DuckDB filter, img2dataset shards); every number comes
from the selected `sd_core.config.Profile` (the ``sd`` resource).
"""

from contextlib import nullcontext
from pathlib import Path

import dagster as dg

from sd_assets.partitions import shards
from sd_assets.resources import SDConfig
from sd_core.data.filter import check_parts, existing_parts, filter_metadata, parts_version
from sd_core.data.image_server import ImageServer
from sd_core.data.metadata import CANONICAL, fetch_source, files_version
from sd_core.data.shards import download_shard
from sd_core.data.synthetic import generate_synthetic, served_by_synthetic_server


def _register_shards(context: dg.AssetExecutionContext, keys: list[str]) -> list[str]:
    """Add the shard keys that are not yet partitions of ``shards``; return the ones added."""
    known = set(context.instance.get_dynamic_partitions(shards.name))
    new = [k for k in keys if k not in known]
    if new:
        context.instance.add_dynamic_partitions(shards.name, new)
    return new


@dg.asset(
    group_name="metadata",
    code_version="1",
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
    mapping = ["| canonical | " + " | ".join(res.columns) + " |", "|---|" + "---|" * len(res.columns)]
    for canon in CANONICAL:
        mapping.append(f"| {canon} | " + " | ".join(str(cols[canon] or "—") for cols in res.columns.values()) + " |")
    metadata: dict[str, dg.RawMetadataValue] = {
        "source": f"{src.kind}: {src.uri or 'embedded synthetic shapes'}",
        "files": dg.MetadataValue.json([str(f) for f in res.files]),
        "num_files": len(res.files),
        "rows": dg.MetadataValue.int(res.rows),
        "bytes": dg.MetadataValue.int(res.bytes),
        "schema": dg.MetadataValue.md("```\n" + res.schema + "\n```"),
        "column_mapping": dg.MetadataValue.md("\n".join(mapping)),
        "path": dg.MetadataValue.path(str(p.metadata_dir)),
    }
    if res.synthetic:
        metadata["synthetic_planted"] = dg.MetadataValue.json(res.synthetic)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(files_version(res.files)))


@dg.asset(
    group_name="metadata",
    deps=[laion_metadata],
    code_version="1",
    kinds={"duckdb", "parquet"},
    check_specs=[dg.AssetCheckSpec(
        "thresholds_hold", asset="filtered_metadata",
        description="Every row of every shard part satisfies every configured filter; no URL appears twice.")],
    description="laion_metadata filtered by the configured quality thresholds (one streaming DuckDB query), "
                "de-duplicated by URL and cut into fixed-size shard parts {data_root}/filtered/{shard}.parquet; "
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
            "rows_in": dg.MetadataValue.int(report.rows_in),
            "rows_out": dg.MetadataValue.int(report.rows_out),
            "removed_by": dg.MetadataValue.json(report.removed_by),
            "new_shards": dg.MetadataValue.json(report.shard_keys),
            "num_shards": len(parts),
            "registered_partitions": dg.MetadataValue.json(added),
            "seconds": report.seconds,
            "path": dg.MetadataValue.path(str(p.filtered_dir)),
        },
        data_version=dg.DataVersion(parts_version(parts)),
        check_results=[dg.AssetCheckResult(
            check_name="thresholds_hold",
            passed=not any(violations.values()),
            metadata={"violations": dg.MetadataValue.json(violations), "parts_checked": len(parts)},
            description=None if not any(violations.values()) else
            "rows violating the current thresholds: parts written under looser settings stay as they are; "
            "re-filter into a fresh data root to apply tighter ones",
        )],
    )


@dg.asset(
    group_name="images",
    partitions_def=shards,
    deps=[filtered_metadata],
    code_version="1",
    kinds={"webdataset"},
    automation_condition=dg.AutomationCondition.on_missing(),
    description="One shard's images, downloaded by img2dataset (a subprocess in its own session, under a "
                "watchdog) into {data_root}/shards/{shard}.tar (+ .parquet, _stats.json). Failed URLs are "
                "counted by reason, never fatal; a shard with no image at all fails.",
)
def image_shards(context: dg.AssetExecutionContext, sd: SDConfig) -> dg.MaterializeResult:
    p = sd.get()
    key = context.partition_key
    part = p.filtered_dir / f"{key}.parquet"
    if not part.is_file():
        raise dg.Failure(f"shard {key}: its filtered part {part} does not exist (materialise filtered_metadata "
                         f"with the same data root first)")
    server = ImageServer() if served_by_synthetic_server(part) else nullcontext()
    with server as srv:
        if srv is not None:
            context.log.info(f"serving the synthetic images on {srv.base_url}")
        report = download_shard(part, p.shards_dir, key, p.download,
                                rewrite=srv.rewrite if srv is not None else None, log=context.log.debug)
    failures = ["| reason | rows |", "|---|---:|"] + [f"| {r} | {n} |" for r, n in report.failures.items()]
    context.log.info(f"shard {key}: {report.successes}/{report.rows} images, failures {report.failures}")
    return dg.MaterializeResult(metadata={
        "rows": dg.MetadataValue.int(report.rows),
        "successes": dg.MetadataValue.int(report.successes),
        "success_rate": dg.MetadataValue.float(round(report.success_rate, 4)),
        "failed_to_download": dg.MetadataValue.int(report.failed_to_download),
        "failed_to_resize": dg.MetadataValue.int(report.failed_to_resize),
        "failures": dg.MetadataValue.md("\n".join(failures)),
        "failures_by_reason": dg.MetadataValue.json(report.failures),
        "bytes": dg.MetadataValue.int(report.bytes),
        "images_per_s": dg.MetadataValue.float(round(report.successes / max(report.seconds, 1e-9), 1)),
        "seconds": report.seconds,
        "tar": dg.MetadataValue.path(report.tar),
    })
