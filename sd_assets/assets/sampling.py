"""Sampling assets: `sample_grid`, the PNG grid rendered from the latest checkpoint's EMA weights.

Fixed prompts and seeds come from ``profile.sample`` (prompt r, column c uses seed ``seeds[c]``), so two grids
of two checkpoints are directly comparable. The grid is written to ``samples/{run}/grid.png`` (and a
``grid_step_XXXXXXXX.png`` copy per checkpoint step), shown in the UI as a base64 PNG in markdown metadata,
and traced to its inputs: checkpoint path and step, plus the lineage recorded by the trainer in the
checkpoint's ``config.json`` (manifest hash, shard list, filter config, source) passed through as metadata.

Which checkpoint: the ``checkpoint_path`` (or ``checkpoint``) metadata of the latest ``unet_checkpoint``
materialization when there is one, else the newest run under ``profile.checkpoints_dir`` (its ``latest``
pointer).

For the tiny profile the prompt-adherence score (``sd_core.adherence``) is reported, with a check that warns
when it is at or below chance level.
"""


import base64
import io
import os
import time
from pathlib import Path
from typing import Any

import dagster as dg

from sd_assets.resources import SDConfig

LINEAGE_KEYS = ("manifest_hash", "shards", "shard_list", "filter", "filter_config", "source", "profile",
                "text", "run_id", "latents_dir", "data_version", "latent_manifest")
UPSTREAM = dg.AssetKey("unet_checkpoint")


def _upstream_checkpoint(context: dg.AssetExecutionContext) -> Path | None:
    try:
        event = context.instance.get_latest_materialization_event(UPSTREAM)
    except Exception:  # pragma: no cover - instance without event storage
        return None
    mat = event.asset_materialization if event is not None else None
    if mat is None:
        return None
    for key in ("checkpoint_path", "checkpoint", "path"):
        value = mat.metadata.get(key)
        if value is None:
            continue
        raw = getattr(value, "value", value)
        raw = getattr(raw, "path", raw)
        if isinstance(raw, str) and Path(raw).exists():
            return Path(raw)
    return None


def find_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``checkpoints_dir``: the ``latest`` of the most recently updated run."""
    from sd_core.checkpoint import CheckpointError, latest_checkpoint

    if not checkpoints_dir.is_dir():
        return None
    runs = [p for p in checkpoints_dir.iterdir() if p.is_dir() and (p / "latest").exists()]
    for run in sorted(runs, key=lambda p: (p / "latest").stat().st_mtime, reverse=True):
        try:
            ckpt = latest_checkpoint(run)
        except CheckpointError:
            continue
        if ckpt is not None:
            return ckpt
    return None


def _run_name(ckpt_dir: Path, checkpoints_dir: Path) -> str:
    """``{run}`` for ``samples/{run}/``: the run directory's name (the parent of ``step_XXXXXXXX``)."""
    if ckpt_dir.name.startswith("step_"):
        return ckpt_dir.parent.name
    return ckpt_dir.stem


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _atomic_save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _lineage_metadata(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in LINEAGE_KEYS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, (dict, list)):
            out[f"lineage/{key}"] = dg.MetadataValue.json(value)
        elif isinstance(value, (int, float, str, bool)):
            out[f"lineage/{key}"] = value
    lineage = config.get("lineage")
    if isinstance(lineage, dict):  # a trainer that nests it
        for key, value in lineage.items():
            out[f"lineage/{key}"] = dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value
    return out


@dg.asset(
    group_name="sampling",
    deps=[UPSTREAM],
    kinds={"pytorch"},
    pool="gpu",
    code_version="sample_grid-1",
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
    from sd_core.adherence import adherence
    from sd_core.sample import generate, image_grid, load_for_sampling, pick_device, resolve_dtype

    profile = sd.get()
    cfg = profile.sample
    ckpt = _upstream_checkpoint(context) or find_checkpoint(profile.checkpoints_dir)
    if ckpt is None:
        raise dg.Failure(
            description=f"no checkpoint found: no unet_checkpoint materialization with a checkpoint_path and no run "
                        f"with a 'latest' pointer under {profile.checkpoints_dir}. Materialise unet_checkpoint first."
        )
    t0 = time.perf_counter()
    device = pick_device()
    bundle = load_for_sampling(ckpt, profile=profile, device=device, use_ema=True, dtype=resolve_dtype("auto", device))
    context.log.info(f"sampling {bundle.checkpoint} (step {bundle.step}, {'EMA' if bundle.ema else 'live'} weights) "
                     f"on {next(bundle.unet.parameters()).device}")
    prompts = list(cfg.prompts)
    seeds = list(cfg.seeds)
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    images = generate(
        bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, all_prompts,
        negative_prompts=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta, seed=all_seeds,
        height=cfg.height, width=cfg.width, scaling_factor=bundle.scaling_factor, batch_size=16,
        max_length=bundle.max_length,
    )
    elapsed = time.perf_counter() - t0
    grid = image_grid(images, rows=len(prompts), labels=prompts)
    run = _run_name(bundle.checkpoint, profile.checkpoints_dir)
    out_dir = profile.samples_dir / run
    grid_path = out_dir / "grid.png"
    _atomic_save(grid, grid_path)
    if bundle.step is not None:
        _atomic_save(grid, out_dir / f"grid_step_{bundle.step:08d}.png")

    metadata: dict[str, Any] = {
        "grid": dg.MetadataValue.md(f"![sample grid](data:image/png;base64,{_png_b64(grid)})"),
        "grid_path": dg.MetadataValue.path(str(grid_path)),
        "checkpoint_path": dg.MetadataValue.path(str(bundle.checkpoint)),
        "checkpoint_step": bundle.step if bundle.step is not None else -1,
        "ema_weights": bundle.ema,
        "prompts": dg.MetadataValue.json(prompts),
        "seeds": dg.MetadataValue.json(seeds),
        "negative_prompt": cfg.negative_prompt or "",
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "eta": cfg.eta,
        "resolution": f"{cfg.width}x{cfg.height}",
        "sampling_seconds": round(elapsed, 2),
        **_lineage_metadata(bundle.config),
    }
    check_results = [
        dg.AssetCheckResult(
            check_name="grid_exists", asset_key="sample_grid",
            passed=_grid_ok(grid_path, grid.size), metadata={"path": str(grid_path)},
        )
    ]
    if profile.name == "tiny":
        result = adherence(images, all_prompts)
        metadata.update(result.as_metadata())
        metadata["adherence_predicted"] = dg.MetadataValue.json(
            [{"prompt": p, "seed": s, "colour": c} for p, s, c in zip(all_prompts, all_seeds, result.predicted)]
        )
        ok = result.n > 0 and result.score > result.chance
        check_results.append(dg.AssetCheckResult(
            check_name="adherence_above_chance", asset_key="sample_grid", passed=ok,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"adherence": result.score if result.n else -1.0, "chance": result.chance, "n": result.n},
            description=None if ok else "colour adherence at or below chance: train longer (more steps) or check "
                                        "the VAE's colour fidelity",
        ))
    else:
        check_results.append(dg.AssetCheckResult(
            check_name="adherence_above_chance", asset_key="sample_grid", passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"skipped": f"adherence is only defined for the tiny profile, not {profile.name!r}"},
        ))
    context.log.info(f"wrote {grid_path} ({len(images)} images in {elapsed:.1f} s)")
    return dg.MaterializeResult(metadata=metadata, check_results=check_results,
                                data_version=dg.DataVersion(f"{run}@{bundle.step}"))


def _grid_ok(path: Path, size: tuple[int, int]) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.size == tuple(size) and im.format == "PNG"
    except Exception:
        return False
