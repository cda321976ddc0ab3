"""Frozen components and the latent cache: ``frozen_components`` → ``latents[shard]``.

Thin wiring over `sd_core.encoding.components` (load / build the VAE, text encoder, tokenizer), `sd_core.encoding.encode`
(one shard tar → latents) and `sd_core.encoding.latent_cache` (the cache). Every number comes from the selected
`sd_core.config.Profile` (the ``sd`` resource).

Versions:

- ``latents``' ``code_version`` = ``ENCODE_FORMAT`` + `sd_core.encoding.components.components_version` of the
  profile this code location was loaded with (``SD_PROFILE``/``SD_DATA_ROOT``): the VAE / text encoder /
  tokenizer sources (tiny: the build settings), the encode resolution and ``max_length``. The scaling factor
  lives in the VAE's config, so it changes with the VAE source (tiny: with the build, below). Changing the
  configured VAE therefore marks every ``latents`` partition stale ("code version changed").
- ``frozen_components`` reports a data version (tiny: a digest of the built weights; sd15: of the ids and
  their configs), so rebuilding the tiny VAE marks ``latents`` stale too ("new dependency data version").
- The cache manifest records both per shard (``code_version``, ``components_digest``) plus the source tar's
  size/mtime; the ``latents_refresh`` schedule (`sd_assets.schedules`) compares them with the current ones
  and requests runs for exactly the shards that are missing or stale.
"""


from typing import Any

import dagster as dg

from sd_assets.partitions import shards
from sd_assets.resources import SDConfig
from sd_core.encoding.components import describe_pretrained
from sd_core.config import Profile, get_profile
from sd_core.encoding.encode import latents_code_version, tar_version

STD_RANGE = (0.5, 1.5)  # what the latents' std check accepts (scaled latents should have std ≈ 1)
TINY_PSNR_WARN_DB = 18.0  # frozen_components check: below this the tiny VAE hardly reconstructs the shapes


# ------------------------------------------------------------------------------------- frozen components
class FrozenComponentsConfig(dg.Config):
    """``rebuild``: rebuild the tiny components even if a build with the same settings exists."""

    rebuild: bool = False


@dg.asset(
    group_name="components",
    code_version="1",
    kinds={"pytorch"},
    check_specs=[dg.AssetCheckSpec("vae_reconstructs", asset="frozen_components",
                                   description=f"tiny profile: the fitted VAE's reconstruction PSNR on held-out "
                                               f"renders is at least {TINY_PSNR_WARN_DB} dB (warning)")],
    description="The frozen VAE, text encoder and tokenizer. tiny: built once into {data_root}/components "
                "(word-level tokenizer over the synthetic vocabulary, seeded CLIPTextModel, AutoencoderKL fitted "
                "on synthetic renders; reports PSNR and colour fidelity). sd15: the configured hub ids or local "
                "directories, resolved and checked against the profile (configs only; weights load where used).",
)
def frozen_components(context: dg.AssetExecutionContext, sd: SDConfig,
                      config: FrozenComponentsConfig) -> dg.MaterializeResult:
    from sd_core.encoding.components import build_tiny_components, component_sources

    p = sd.get()
    if not p.components.build_tiny:
        try:
            meta, version = describe_pretrained(p)
        except ValueError as e:
            raise dg.Failure(str(e)) from e
        return dg.MaterializeResult(
            metadata=meta, data_version=dg.DataVersion(version),
            check_results=[dg.AssetCheckResult(check_name="vae_reconstructs", passed=True,
                                               metadata={"note": "pretrained VAE: not measured"})])

    info = build_tiny_components(p, force=config.rebuild, log=context.log.info)
    rec = info["reconstruction"]
    src = component_sources(p)
    psnr = float(rec["psnr"])
    meta: dict[str, Any] = {
        "vae": dg.MetadataValue.path(src.vae),
        "text_encoder": dg.MetadataValue.path(src.text_encoder),
        "tokenizer": dg.MetadataValue.path(src.tokenizer),
        "vae_params": dg.MetadataValue.int(info["params"]["vae"]),
        "text_encoder_params": dg.MetadataValue.int(info["params"]["text_encoder"]),
        "vocab_size": dg.MetadataValue.int(info["vocab_size"]),
        "psnr_db": dg.MetadataValue.float(round(psnr, 2)),
        "colour_accuracy": dg.MetadataValue.float(round(rec["colour_accuracy"], 3)),
        "background_accuracy": dg.MetadataValue.float(round(rec["background_accuracy"], 3)),
        "colour_error_rgb": dg.MetadataValue.float(round(rec["colour_error"], 1)),
        "colour_accuracy_by_colour": dg.MetadataValue.json(rec["per_colour_accuracy"]),
        "scaling_factor": dg.MetadataValue.float(info["scaling_factor"]),
        "fit_steps": dg.MetadataValue.int(info["fit"]["steps"]),
        "fit_seconds": dg.MetadataValue.float(info["fit"]["seconds"]),
        "digest": info["digest"],
    }
    return dg.MaterializeResult(
        metadata=meta, data_version=dg.DataVersion(info["digest"]),
        check_results=[dg.AssetCheckResult(
            check_name="vae_reconstructs", passed=psnr >= TINY_PSNR_WARN_DB, severity=dg.AssetCheckSeverity.WARN,
            metadata={"psnr_db": round(psnr, 2), "floor_db": TINY_PSNR_WARN_DB,
                      "colour_accuracy": round(rec["colour_accuracy"], 3)})],
    )


# ------------------------------------------------------------------------------------------------ latents
_LOADED = get_profile()  # the profile this code location was loaded with: decides the code version


def build_latents_asset(profile: Profile) -> dg.AssetsDefinition:
    """The ``latents`` asset with the code version of ``profile`` (the module-level asset uses the profile of
    the environment; tests build variants to show that a VAE change marks partitions stale)."""

    @dg.asset(
        name="latents",
        group_name="encoding",
        partitions_def=shards,
        deps=[dg.AssetKey("image_shards"), dg.AssetKey("frozen_components")],
        code_version=latents_code_version(profile),
        automation_condition=dg.AutomationCondition.on_missing(),
        pool="gpu",
        kinds={"numpy"},
        check_specs=[dg.AssetCheckSpec(
            "latent_stats_sane", asset="latents",
            description=f"the shard's scaled latents have std in {STD_RANGE} and no NaN/inf")],
        description="One shard's latent cache: the tar decoded in worker processes, resized/centre-cropped, "
                    "encoded with the frozen VAE (posterior mean x scaling factor; bf16 autocast on CUDA, one "
                    "process per GPU), captions tokenized; written atomically to {data_root}/latents/{shard}.npy "
                    "(N, 4, h, w) float16 + {shard}.parquet (key, caption, token_ids) + manifest.json. "
                    "Undecodable samples are skipped and counted.",
    )
    def latents(context: dg.AssetExecutionContext, sd: SDConfig) -> dg.MaterializeResult:
        from sd_core.encoding.components import components_digest
        from sd_core.encoding.encode import encode_shard, latent_stats

        p = sd.get()
        key = context.partition_key
        tar = p.shards_dir / f"{key}.tar"
        if not tar.is_file():
            raise dg.Failure(f"shard {key}: {tar} does not exist (materialise image_shards for this partition "
                             f"with the same data root first)")
        version = latents_code_version(p)
        if version != latents_code_version(profile):
            context.log.warning(f"run config changes the encoding (version {version}) but this code location was "
                                f"loaded with {latents_code_version(profile)}: the manifest records {version}")

        def progress(d: dict[str, Any]) -> None:
            context.log.info(f"shard {key}: {d['encoded']} encoded, {d['skipped']} skipped, "
                             f"{d['images_per_s']} img/s")

        report = encode_shard(
            tar, p.latents_dir, key, p, code_version=version, progress=progress,
            extra={"components_digest": components_digest(p), "source_version": tar_version(tar)},
        )
        stats = latent_stats(p.latents_dir, key)
        lo, hi = STD_RANGE
        passed = stats["nonfinite"] == 0 and (stats["count"] == 0 or lo <= stats["std"] <= hi)
        context.log.info(f"shard {key}: {report.encoded} latents ({report.skipped} skipped) at "
                         f"{report.images_per_s} img/s on {report.device}; mean {stats['mean']:.3f}, "
                         f"std {stats['std']:.3f}")
        if report.skipped:
            context.log.warning(f"shard {key}: skipped {report.skipped} undecodable sample(s), e.g. "
                                f"{report.skipped_examples[:3]}")
        entry = report.manifest_entry
        return dg.MaterializeResult(
            metadata={
                "encoded": dg.MetadataValue.int(report.encoded),
                "skipped": dg.MetadataValue.int(report.skipped),
                "images_per_s": dg.MetadataValue.float(report.images_per_s),
                "seconds": dg.MetadataValue.float(report.seconds),
                "latent_mean": dg.MetadataValue.float(round(stats["mean"], 4)),
                "latent_std": dg.MetadataValue.float(round(stats["std"], 4)),
                "latent_shape": dg.MetadataValue.json(report.latent_shape),
                "device": report.device,
                "processes": dg.MetadataValue.int(report.processes),
                "scaling_factor": dg.MetadataValue.float(float(entry["scaling_factor"])),
                "content_hash": entry["hash"],
                "encode_version": version,
                "skipped_examples": dg.MetadataValue.json(report.skipped_examples),
                "path": dg.MetadataValue.path(str(p.latents_dir / f"{key}.npy")),
            },
            data_version=dg.DataVersion(entry["hash"]),
            check_results=[dg.AssetCheckResult(
                check_name="latent_stats_sane", passed=bool(passed),
                metadata={"std": round(stats["std"], 4), "mean": round(stats["mean"], 4),
                          "nonfinite": stats["nonfinite"], "count": stats["count"],
                          "accepted_std": f"{lo}-{hi}"})],
        )

    return latents


latents = build_latents_asset(_LOADED)
