"""Frozen components and the latent cache: ``frozen_components`` → ``latents[shard]``.

Thin wiring over `sd_core.encoding.components` (load / build the VAE, text encoder, tokenizer),
`sd_core.encoding.encode` (one shard tar → latents) and `sd_core.encoding.latent_cache` (the cache). Every
number comes from the selected `sd_core.config.Profile` (the ``sd`` resource).

Versions:

- ``latents``' ``code_version`` = ``ENCODE_FORMAT`` + `sd_core.encoding.versions.components_version` of the
  profile this code location was loaded with (``SD_PROFILE``/``SD_DATA_ROOT``): the VAE / text encoder /
  tokenizer sources (tiny: the build settings), the encode resolution and ``max_length``. The scaling factor
  lives in the VAE's config, so it changes with the VAE source (tiny: with the build, below). Changing the
  configured VAE therefore marks every ``latents`` partition stale ("code version changed").
- ``frozen_components`` reports a data version (tiny: a digest of the built weights; sd15: of the ids and
  their configs), so rebuilding the tiny VAE marks ``latents`` stale too ("new dependency data version").
- The cache manifest records both per shard (``code_version``, ``components_digest``) plus the source tar's
  size/mtime; the ``latents_refresh`` schedule (`sd_assets.schedules`) compares them with the current ones
  and requests runs for exactly the shards that are missing or stale.

The code location loads without torch (`sd_core.encoding.versions` computes the code versions): the modules
that need it are imported in the asset bodies, so a ``dagster`` command, the webserver and the daemon start
without it.
"""


from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from sd_assets.assets.data import image_shards
from sd_assets.partitions import refuse_writes_outside, shard_input, shard_partition_key, shards
from sd_assets.resources import SDConfig, settings_read
from sd_core.config import Profile, get_profile
from sd_core.encoding.latent_cache import MANIFEST, shard_paths
from sd_core.encoding.versions import (component_sources, components_digest, components_version, latents_code_version,
                                       tar_version)

if TYPE_CHECKING:  # the modules that import torch load in the asset bodies, not with the code location
    from sd_core.encoding.encode import EncodeReport

STD_RANGE = (0.5, 1.5)  # what the latents' std check accepts (scaled latents should have std ≈ 1)
TINY_PSNR_WARN_DB = 18.0  # frozen_components check: below this the tiny VAE hardly reconstructs the shapes


# ------------------------------------------------------------------------------------- frozen components
class FrozenComponentsConfig(dg.Config):
    """``rebuild``: rebuild the tiny components even if a build with the same settings exists."""

    rebuild: bool = False


_LOADED = get_profile()  # the profile this code location was loaded with: decides the code versions


@dg.asset(
    group_name="components",
    # the build settings (tiny) or sources (sd15) are part of the version: a VAE of other settings (a new
    # default, an override in the profile's environment) marks the components stale in the UI and in `make demo`,
    # instead of leaving the old build in place under latents encoded for the new settings
    code_version=f"1-{components_version(_LOADED)}",
    metadata=settings_read("components"),  # the run config's own, which the code version cannot see
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
    from sd_core.encoding.components import build_tiny_components

    p = sd.get()
    if not p.components.build_tiny:
        return _pretrained_components(p)
    return _tiny_components(p, build_tiny_components(p, force=config.rebuild, log=context.log.info))


def _pretrained_components(p: Profile) -> dg.MaterializeResult:
    """sd15: the configured sources, checked against the profile; the VAE's quality is not measured."""
    from sd_core.encoding.components import describe_pretrained

    try:
        meta, version = describe_pretrained(p)
    except ValueError as e:
        raise dg.Failure(str(e)) from e
    return dg.MaterializeResult(
        metadata=meta, data_version=dg.DataVersion(version),
        check_results=[dg.AssetCheckResult(check_name="vae_reconstructs", passed=True,
                                           metadata={"note": "pretrained VAE: not measured"})])


def _tiny_components(p: Profile, info: dict[str, Any]) -> dg.MaterializeResult:
    """tiny: the build record (``build.json``) as metadata, and its held-out reconstruction as the check."""
    from sd_core.encoding.vae_fit import ColourReport

    src = component_sources(p)
    reconstruction = ColourReport(**info["reconstruction"])
    fidelity = reconstruction.as_metadata()
    meta: dict[str, Any] = {
        "vae": dg.MetadataValue.path(src.vae),
        "text_encoder": dg.MetadataValue.path(src.text_encoder),
        "tokenizer": dg.MetadataValue.path(src.tokenizer),
        "vae_params": info["params"]["vae"],
        "text_encoder_params": info["params"]["text_encoder"],
        "vocab_size": info["vocab_size"],
        **fidelity,
        "scaling_factor": float(info["scaling_factor"]),
        "fit_steps": info["fit"]["steps"],
        "fit_seconds": float(info["fit"]["seconds"]),
        "fit_source": info["fit"].get("source", "fitted here"),  # "shipped": sd_core.encoding.shipped_vae
        "digest": info["digest"],
    }
    return dg.MaterializeResult(
        metadata=meta, data_version=dg.DataVersion(info["digest"]),
        check_results=[dg.AssetCheckResult(
            check_name="vae_reconstructs", passed=reconstruction.psnr >= TINY_PSNR_WARN_DB,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"psnr_db": fidelity["psnr_db"], "floor_db": TINY_PSNR_WARN_DB,
                      "colour_accuracy": fidelity["colour_accuracy"]})],
    )


# ------------------------------------------------------------------------------------------------ latents
def build_latents_asset(profile: Profile) -> dg.AssetsDefinition:
    """The ``latents`` asset with the code version of ``profile`` (the module-level asset uses the profile of
    the environment; tests build variants to show that a VAE change marks partitions stale)."""
    loaded_version = latents_code_version(profile)

    @dg.asset(
        name="latents",
        group_name="encoding",
        partitions_def=shards,
        deps=[image_shards, frozen_components],
        code_version=loaded_version,
        # the VAE and tokenizer the latents come from, and what shapes them; not the batch size or workers
        metadata=settings_read("components", "encode.resolution", "encode.precision"),
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
        from sd_core.encoding.encode import latent_stats

        p = sd.get()
        key = shard_partition_key(context)
        refuse_writes_outside(key, p.data_root,
                              lambda: [p.latents_dir / MANIFEST, *astuple(shard_paths(p.latents_dir, key))])
        tar = shard_input(key, p.shards_dir / f"{key}.tar", image_shards)
        version = latents_code_version(p)
        if version != loaded_version:
            context.log.warning(f"run config changes the encoding (version {version}) but this code location was "
                                f"loaded with {loaded_version}: the manifest records {version}")
        report = _encode(context, p, key, tar, version)
        stats = latent_stats(p.latents_dir, key)
        _log_encoded(context, key, report, stats)
        return dg.MaterializeResult(
            metadata={**report.as_metadata(), "latent_mean": round(stats["mean"], 4),
                      "latent_std": round(stats["std"], 4), "encode_version": version,
                      "path": dg.MetadataValue.path(str(p.latents_dir / f"{key}.npy"))},
            data_version=dg.DataVersion(report.manifest_entry["hash"]),
            check_results=[_latent_stats_check(stats)],
        )

    return latents


def _encode(context: dg.AssetExecutionContext, p: Profile, key: str, tar: Path, version: str) -> "EncodeReport":
    """Encode one shard tar into the cache, recording what staleness is judged by: the encode version, the
    components' digest and the tar's identity (see the module docstring)."""
    from sd_core.encoding.encode import ShardCountError, encode_shard

    def progress(d: dict[str, Any]) -> None:
        context.log.info(f"shard {key}: {d['encoded']} encoded, {d['skipped']} skipped, {d['images_per_s']} img/s")

    try:
        return encode_shard(
            tar, p.latents_dir, key, p, code_version=version, progress=progress,
            extra={"components_digest": components_digest(p), "source_version": tar_version(tar)},
        )
    except ShardCountError as e:  # a truncated/damaged tar: refuse, and keep the shard's previous cache
        raise dg.Failure(str(e), metadata={"tar": dg.MetadataValue.path(e.tar), "samples_read": e.read,
                                           "samples_recorded": e.expected, "record": e.record}) from e


def _log_encoded(context: dg.AssetExecutionContext, key: str, report: "EncodeReport", stats: dict[str, float]
                 ) -> None:
    context.log.info(f"shard {key}: {report.encoded} latents ({report.skipped} skipped) at "
                     f"{report.images_per_s} img/s on {report.device}; mean {stats['mean']:.3f}, "
                     f"std {stats['std']:.3f}")
    if report.skipped:
        context.log.warning(f"shard {key}: skipped {report.skipped} undecodable sample(s), e.g. "
                            f"{report.skipped_examples[:3]}")


def _latent_stats_check(stats: dict[str, float]) -> dg.AssetCheckResult:
    """No NaN/inf, and a std in `STD_RANGE` (an empty shard has no std to judge)."""
    lo, hi = STD_RANGE
    passed = stats["nonfinite"] == 0 and (stats["count"] == 0 or lo <= stats["std"] <= hi)
    return dg.AssetCheckResult(
        check_name="latent_stats_sane", passed=bool(passed),
        metadata={"std": round(stats["std"], 4), "mean": round(stats["mean"], 4), "nonfinite": stats["nonfinite"],
                  "count": stats["count"], "accepted_std": f"{lo}-{hi}"})


latents = build_latents_asset(_LOADED)
