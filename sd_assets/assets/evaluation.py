"""Evaluation assets: `checkpoint_eval`, every checkpoint step of the latest training run scored once.

One materialisation per checkpoint step, in step order (earlier steps logged as `AssetMaterialization`
events of this asset, the last one as its result), so the asset page's metadata **Plots** view shows every numeric metric
against training progress and **Events** pages through the per-step grids. Each carries the checkpoint path
and step, the lineage its ``config.json`` records (``lineage/manifest_hash``, ``lineage/shards``,
``lineage/filter``, ``lineage/source``), the metrics of `sd_core.evaluation.checkpoint_eval` and the best
checkpoint so far (``best_checkpoint``, ``best_step``, ``best_metric``, ``best_value``).

Which run: the run directory of the latest ``unet_checkpoint`` materialisation's ``checkpoint_path``, else the
newest run under ``profile.checkpoints_dir``. What is new: the run's checkpoints whose (path, save time) no
earlier materialisation of this asset names; when there is none the step emits nothing (a second
materialisation adds nothing). Every scored step is also kept in ``{run_dir}/eval_scores.json`` (what
``sd generate --which best`` reads).
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import dagster as dg

from sd_assets.assets.sampling import lineage_metadata, png_b64, upstream_checkpoint
from sd_assets.assets.training import unet_checkpoint
from sd_assets.resources import SDConfig
from sd_core.config import Profile

if TYPE_CHECKING:  # torch's modules load in the asset body, not with the code location (sd_assets.assets.latents)
    from sd_core.evaluation.checkpoint_eval import EvalSettings, Evaluator, StepScore

ASSET_NAME = "checkpoint_eval"
GRID_MAX_SIDE = 1024  # the inline grid is downscaled to this (sd15 grids are 2048 px wide)


class EvalAssetConfig(dg.Config):
    """Run config of `checkpoint_eval` (sampler settings come from the profile's ``sample`` section)."""

    seeds_per_prompt: int = 4  # tiny: seeds per (colour, shape, background); 36 prompts × this many images
    eps_buckets: int = 10  # validation ε-MSE timestep buckets over [0, 1000)
    clip_model: str = ""  # sd15: CLIPModel id or folder for CLIP score / CLIP-FD; "" = the text encoder's source
    clip_prompts: int = 64  # sd15: held-out captions generated per checkpoint
    inception_weights: str = ""  # sd15: path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds fid_inception
    batch_size: int = 32  # images per UNet batch


def _run_dir(context: dg.AssetExecutionContext, checkpoints_dir: Path) -> Path:
    from sd_core.evaluation.checkpoint_eval import run_dir_of
    from sd_core.sampling.grid import find_checkpoint

    ckpt = upstream_checkpoint(context) or find_checkpoint(checkpoints_dir)
    if ckpt is None:
        raise dg.Failure(description=f"no checkpoint to evaluate: no unet_checkpoint materialization with a "
                                     f"checkpoint_path and no run with a 'latest' pointer under {checkpoints_dir}. "
                                     f"Materialise unet_checkpoint first.")
    return run_dir_of(Path(ckpt)).resolve()


def _value(md: dict[str, Any], key: str) -> Any:
    raw = md.get(key)
    return getattr(raw, "value", raw)


def previous_summaries(instance: dg.DagsterInstance, run_dir: Path) -> list[dict[str, Any]]:
    """What earlier materialisations of this asset scored for ``run_dir`` (newest record per checkpoint)."""
    found: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        page = instance.fetch_materializations(dg.AssetKey(ASSET_NAME), limit=500, cursor=cursor)
        for rec in page.records:
            md = dict(rec.asset_materialization.metadata or {})
            if str(_value(md, "run_dir")) != str(run_dir) or _value(md, "checkpoint_key") in found:
                continue
            found[_value(md, "checkpoint_key")] = {
                "step": int(_value(md, "checkpoint_step")), "checkpoint": str(_value(md, "checkpoint_path")),
                "key": _value(md, "checkpoint_key"),
                "metrics": {k: _value(md, k) for k in md if isinstance(_value(md, k), (int, float))
                            and not isinstance(_value(md, k), bool)}}
        if not page.has_more:
            return list(found.values())
        cursor = page.cursor


def _grid_markdown(score: "StepScore") -> str:
    grid = score.grid.copy()
    grid.thumbnail((GRID_MAX_SIDE, GRID_MAX_SIDE))
    return f"![step {score.step} grid](data:image/png;base64,{png_b64(grid)})"


def step_metadata(score: "StepScore", run_dir: Path, best: dict[str, Any] | None, metric_name: str) -> dict[str, Any]:
    """One step's materialisation metadata: checkpoint, lineage, metrics, grid and the best step so far."""
    md: dict[str, Any] = {
        "checkpoint_path": dg.MetadataValue.path(str(score.checkpoint)),
        "checkpoint_step": score.step,
        "checkpoint_key": score.key,
        "run_dir": dg.MetadataValue.path(str(run_dir)),
        **lineage_metadata(score.record),
        **score.metrics,
        "grid": dg.MetadataValue.md(_grid_markdown(score)),
        "grid_path": dg.MetadataValue.path(str(score.grid_path)),
        "eval_seconds": round(score.seconds, 2),
        "best_metric": metric_name,
    }
    if best is not None:
        md.update(best_checkpoint=dg.MetadataValue.path(best["checkpoint"]), best_step=int(best["step"]),
                  best_value=float(best["metrics"][metric_name]))
    return md


def _evaluator(profile: Profile, settings: "EvalSettings", first_checkpoint: Path, run_dir: Path) -> "Evaluator":
    """The evaluator of ``run_dir``, or a Failure that names the file it could not use."""
    from sd_core.evaluation.checkpoint_eval import EvaluationError, Evaluator
    from sd_core.evaluation.clip_metrics import ClipModelError
    from sd_core.evaluation.inception_fid import InceptionWeightsError
    from sd_core.sampling.generate import CompatibilityError
    from sd_core.training.checkpoint import CheckpointError

    try:
        return Evaluator(profile, settings, first_checkpoint)
    except (EvaluationError, ClipModelError, InceptionWeightsError, CheckpointError,
            CompatibilityError) as exc:  # each names its file
        raise dg.Failure(description=f"cannot evaluate {run_dir}: {exc}") from exc


@dg.asset(
    group_name="evaluation",
    deps=[unet_checkpoint],
    kinds={"pytorch"},
    pool="gpu",
    code_version="checkpoint_eval-1",
    # no `settings_read`: it scores each checkpoint once, so a changed sampler alone would find nothing new to
    # score; a new checkpoint (unet_checkpoint re-runs) re-runs it
    output_required=False,  # nothing new to score: no materialisation
)
def checkpoint_eval(context: dg.AssetExecutionContext, config: EvalAssetConfig, sd: SDConfig
                    ) -> Iterator[dg.MaterializeResult]:
    """Every not yet scored checkpoint step of the latest run: validation ε-MSE per timestep bucket, the
    per-step sample grid, prompt accuracy (tiny) or CLIP score / CLIP-FD (sd15), and the best checkpoint."""
    from sd_core.evaluation.checkpoint_eval import (EvalSettings, best_summary, checkpoint_key, pending_checkpoints,
                                                    primary_metric, pruned_steps, write_scores)

    profile = sd.get()
    settings = EvalSettings(seeds_per_prompt=config.seeds_per_prompt, eps_buckets=config.eps_buckets,
                            clip_model=config.clip_model, clip_prompts=config.clip_prompts,
                            inception_weights=config.inception_weights, batch_size=config.batch_size)
    run_dir = _run_dir(context, profile.checkpoints_dir)
    summaries = previous_summaries(context.instance, run_dir)
    todo = pending_checkpoints(run_dir, {s["key"] for s in summaries})
    gone = pruned_steps(run_dir)
    if gone:
        context.log.warning(f"steps {gone} of {run_dir} were pruned (train.keep_last) before they were scored")
    if not todo:
        context.log.info(f"every checkpoint of {run_dir} is already scored ({len(summaries)} steps): nothing new")
        return
    metric = primary_metric(profile)
    context.log.info(f"scoring steps {[r.step for _, r in todo]} of {run_dir}")
    evaluator = _evaluator(profile, settings, todo[0][0], run_dir)
    for warning in evaluator.warnings:
        context.log.warning(warning)
    for i, (ckpt, _) in enumerate(todo):
        score = evaluator.score(ckpt)
        summaries = [s for s in summaries if s["key"] != checkpoint_key(ckpt, score.record.saved_at)]
        summaries.append(score.summary())
        write_scores(run_dir, summaries, metric)
        md = step_metadata(score, run_dir, best_summary(summaries, metric), metric.name)
        context.log.info(f"step {score.step}: {metric.name} {score.metrics.get(metric.name)}, val ε-MSE "
                         f"{score.metrics.get('val_eps_mse')} ({score.seconds:.1f} s)")
        if i < len(todo) - 1:
            context.log_event(dg.AssetMaterialization(asset_key=context.asset_key, metadata=md))
        else:
            yield dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(f"{run_dir.name}@{score.step}"))
