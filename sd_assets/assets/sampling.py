"""Sampling assets: `sample_grid`, the PNG grid rendered from the latest checkpoint's EMA weights.

Fixed prompts and seeds come from ``profile.sample`` (prompt r, column c uses seed ``seeds[c]``), so two grids
of two checkpoints are directly comparable. The grid is written to ``samples/{run}/grid.png`` (and a
``grid_step_XXXXXXXX.png`` copy per checkpoint step), shown in the UI as a base64 PNG in markdown metadata,
and traced to its inputs: checkpoint path and step, plus the lineage recorded by the trainer in the
checkpoint's ``config.json`` (manifest hash, shard list, filter config, source) passed through as metadata.

Which checkpoint: the ``checkpoint_path`` metadata of the latest ``unet_checkpoint``
materialization when there is one, else the newest run under ``profile.checkpoints_dir`` (its ``latest``
pointer).

For the tiny profile the prompt-adherence score (``sd_core.sampling.adherence``) is reported, with a check that warns
when it is at or below chance level.
"""


import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from sd_assets.assets.training import unet_checkpoint
from sd_assets.resources import SDConfig, settings_read
from sd_core.config import Profile

if TYPE_CHECKING:  # torch's modules load in the asset body, not with the code location (sd_assets.assets.latents)
    from sd_core.sampling.grid import SampleGrid
    from sd_core.training.checkpoint import CheckpointConfig


def upstream_checkpoint(context: dg.AssetExecutionContext) -> Path | None:
    """The checkpoint of the latest ``unet_checkpoint`` materialisation, if it still exists."""
    try:
        event = context.instance.get_latest_materialization_event(unet_checkpoint.key)
    except Exception:  # pragma: no cover - instance without event storage
        return None
    mat = event.asset_materialization if event is not None else None
    if mat is None:
        return None
    value = mat.metadata.get("checkpoint_path")  # what unet_checkpoint reports
    raw = getattr(value, "value", value)
    return Path(raw) if isinstance(raw, str) and Path(raw).exists() else None


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def lineage_metadata(config: "CheckpointConfig | None") -> dict[str, Any]:
    """The checkpoint's recorded lineage as ``lineage/{key}`` metadata entries."""
    if config is None:
        return {}
    return {f"lineage/{key}": dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value
            for key, value in config.lineage().items()}


def _grid_metadata(out: "SampleGrid", profile: Profile) -> dict[str, Any]:
    """The grid itself (a base64 PNG in markdown), the settings it was sampled with and its lineage."""
    cfg = profile.sample
    return {
        "grid": dg.MetadataValue.md(f"![sample grid](data:image/png;base64,{png_b64(out.grid)})"),
        "grid_path": dg.MetadataValue.path(str(out.grid_path)),
        "checkpoint_path": dg.MetadataValue.path(str(out.checkpoint)),
        "checkpoint_step": out.step if out.step is not None else -1,
        "ema_weights": out.ema,
        "prompts": list(cfg.prompts),
        "seeds": list(cfg.seeds),
        "negative_prompt": cfg.negative_prompt or "",
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "eta": cfg.eta,
        "guidance_min_timestep": cfg.guidance_min_timestep,
        "resolution": f"{cfg.width}x{cfg.height}",
        "sampling_seconds": round(out.seconds, 2),
        **lineage_metadata(out.checkpoint_config),
    }


def _adherence(out: "SampleGrid", profile: Profile) -> tuple[dict[str, Any], dg.AssetCheckResult]:
    """The prompt-adherence metadata and the check that warns at or below chance (tiny profile only)."""
    result = out.adherence
    if result is None:
        return {}, dg.AssetCheckResult(
            check_name="adherence_above_chance", passed=True, severity=dg.AssetCheckSeverity.WARN,
            metadata={"skipped": f"adherence is only defined for the tiny profile, not {profile.name!r}"})
    predicted = [{"prompt": p, "seed": s, "colour": c} for p, s, c in zip(out.prompts, out.seeds, result.predicted)]
    ok = result.n > 0 and result.above_chance
    check = dg.AssetCheckResult(
        check_name="adherence_above_chance", passed=ok, severity=dg.AssetCheckSeverity.WARN,
        metadata={"adherence": result.score if result.n else -1.0, "chance": result.chance, "n": result.n},
        description=None if ok else "colour adherence at or below chance: train longer (more steps) or check "
                                    "the VAE's colour fidelity",
    )
    return {**result.as_metadata(), "adherence_predicted": predicted}, check


@dg.asset(
    group_name="sampling",
    deps=[unet_checkpoint],
    kinds={"pytorch"},
    pool="gpu",
    code_version="sample_grid-1",
    metadata=settings_read("sample"),
    check_specs=[
        dg.AssetCheckSpec("grid_exists", asset="sample_grid",
                          description="samples/{run}/grid.png exists and is a readable PNG of the expected size"),
        dg.AssetCheckSpec("adherence_above_chance", asset="sample_grid",
                          description="tiny profile: prompt-colour adherence above chance (WARN otherwise)"),
    ],
)
def sample_grid(context: dg.AssetExecutionContext, sd: SDConfig) -> dg.MaterializeResult:
    """DDIM (profile.sample.steps) + CFG (profile.sample.guidance) images of the fixed prompts × seeds from
    the latest checkpoint's EMA weights, as one PNG grid with the prompts as row labels."""
    from sd_core.sampling.grid import find_checkpoint, grid_is_valid, make_sample_grid

    profile = sd.get()
    ckpt = upstream_checkpoint(context) or find_checkpoint(profile.checkpoints_dir)
    if ckpt is None:
        raise dg.Failure(
            description=f"no checkpoint found: no unet_checkpoint materialization with a checkpoint_path and no run "
                        f"with a 'latest' pointer under {profile.checkpoints_dir}. Materialise unet_checkpoint first."
        )
    context.log.info(f"sampling {ckpt} ({len(profile.sample.prompts)} prompts x {len(profile.sample.seeds)} seeds)")
    out = make_sample_grid(ckpt, profile)
    grid_check = dg.AssetCheckResult(check_name="grid_exists", passed=grid_is_valid(out.grid_path, out.grid.size),
                                     metadata={"path": str(out.grid_path)})
    adherence_metadata, adherence_check = _adherence(out, profile)
    context.log.info(f"wrote {out.grid_path} ({len(out.images)} images in {out.seconds:.1f} s)")
    return dg.MaterializeResult(metadata={**_grid_metadata(out, profile), **adherence_metadata},
                                check_results=[grid_check, adherence_check],
                                data_version=dg.DataVersion(f"{out.run}@{out.step}"))
