"""Scoring the checkpoints of a training run: which steps are new, one step's metrics, the best checkpoint.

A run directory holds a checkpoint every ``checkpoint_every`` steps plus the final one (older ones pruned to
``train.keep_last``: a pruned step cannot be scored afterwards). :class:`Evaluator` scores one checkpoint
deterministically (fixed prompts, seeds and noise) with the EMA weights, on every profile:

- held-out ε-MSE per timestep bucket and overall (`sd_core.evaluation.eps_buckets`);
- the sample grid of ``profile.sample`` (as `sample_grid` renders it), kept per step on disk;

and, by the data the profile trains on:

- synthetic source (the tiny profile): prompt accuracy over every (colour, shape, background) × seeds:
  colour, shape, background and whole prompt, with chance levels and the scorers' ceilings on true renders
  and on the VAE's reconstructions (`sd_core.evaluation.prompt_scorer`);
- any other source (sd15): CLIP score on held-out captions and CLIP-FD to the held-out images
  (`sd_core.evaluation.clip_metrics`), and, when ``inception_weights`` names pytorch-fid's weights file, the
  standard Inception FID between the same images (`sd_core.evaluation.inception_fid`).

The profile's primary metric picks the best checkpoint: whole-prompt accuracy (higher is better) or CLIP-FD
(lower is better); ties go to the lower validation ε-MSE, then to the later step. Every scored step is also
written to ``{run_dir}/eval_scores.json`` so that ``sd generate --checkpoint RUN_DIR --which best`` works
without Dagster (:func:`best_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from sd_core.atomic import write_json_atomic
from sd_core.config import Profile
from sd_core.encoding.components import tokenize
from sd_core.encoding.latent_cache import read_shard_table
from sd_core.encoding.versions import component_sources
from sd_core.evaluation import clip_metrics as clipm
from sd_core.evaluation import inception_fid
from sd_core.evaluation import prompt_scorer
from sd_core.evaluation.eps_buckets import HeldOut, bucketed_eps_mse, held_out_split
from sd_core.sampling.generate import (SamplingBundle, generate, latents_to_pil, load_for_sampling, pick_device,
                                       resolve_dtype, sample_settings)
from sd_core.sampling.grid import render_grid, run_name, step_grid_path, write_png
from sd_core.training import checkpoint as ckpt_mod
from sd_core.training.checkpoint import CheckpointConfig, CheckpointError

SCORES_FILE = "eval_scores.json"
SCORES_FORMAT = 1


class EvaluationError(ValueError):
    """A run or checkpoint cannot be evaluated, or its scores cannot be read (the message names the file)."""


@dataclass(frozen=True)
class EvalSettings:
    """How much evaluation each checkpoint gets (the sampler settings themselves are ``profile.sample``)."""

    seeds_per_prompt: int = 4  # synthetic source: seeds per (colour, shape, background): 144 images
    eps_buckets: int = 10  # timestep buckets over [0, 1000)
    eps_batch_size: int = 32
    clip_model: str = ""  # sd15: a CLIPModel id or folder; "" = the profile's text encoder source
    clip_prompts: int = 64  # sd15: held-out captions to generate (and held-out images to compare with)
    inception_weights: str = ""  # sd15: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "" = no Inception FID
    batch_size: int = 32  # images per UNet batch when generating

    def check(self) -> "EvalSettings":
        """Refuse values that cannot work, naming the field."""
        for name in ("seeds_per_prompt", "eps_buckets", "eps_batch_size", "batch_size"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"checkpoint_eval: {name} must be at least 1, got {getattr(self, name)}")
        if self.clip_prompts < 2:
            raise EvaluationError(f"checkpoint_eval: clip_prompts must be at least 2 (a Fréchet distance needs "
                                  f"two samples), got {self.clip_prompts}")
        weights = Path(self.inception_weights).expanduser()
        if self.inception_weights and not weights.is_file():  # refused before any model is loaded
            raise EvaluationError(f"checkpoint_eval: inception_weights {weights} not found: expected pytorch-fid's "
                                  f"{inception_fid.WEIGHTS_FILE} (from {inception_fid.WEIGHTS_URL})")
        return self


@dataclass(frozen=True)
class PrimaryMetric:
    name: str
    higher_is_better: bool


def uses_prompt_accuracy(profile: Profile) -> bool:
    """Whether the profile trains on the synthetic world, whose prompts the pixel scorers can check."""
    return profile.source.kind == "synthetic"


def primary_metric(profile: Profile) -> PrimaryMetric:
    if uses_prompt_accuracy(profile):
        return PrimaryMetric("accuracy/whole", True)
    return PrimaryMetric("clip_fd", False)


# ------------------------------------------------------------------------------------------ run dir
def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint directory (``.../{run}/step_XXXXXXXX``)."""
    return checkpoint.parent if checkpoint.name.startswith("step_") else checkpoint


def checkpoint_key(checkpoint: Path, saved_at: float | None) -> str:
    """Identifies one saved checkpoint: its path and save time (a step re-saved by a restarted run is new)."""
    return f"{Path(checkpoint).resolve()}@{saved_at}"


def pending_checkpoints(run_dir: Path, scored: set[str]) -> list[tuple[Path, CheckpointConfig]]:
    """The run's complete checkpoints not in ``scored`` (keys of :func:`checkpoint_key`), in step order."""
    out = []
    for ckpt in ckpt_mod.list_checkpoints(run_dir):
        record = ckpt_mod.read_config(ckpt)
        if checkpoint_key(ckpt, record.saved_at) not in scored:
            out.append((ckpt.resolve(), record))
    return out


def pruned_steps(run_dir: Path) -> list[int]:
    """Checkpoint steps the run wrote (every ``checkpoint_every`` up to its latest step) that are no longer on
    disk, e.g. pruned by ``keep_last``: they cannot be scored."""
    present = {ckpt_mod.checkpoint_step(p) for p in ckpt_mod.list_checkpoints(run_dir)}
    if not present:
        return []
    every = ckpt_mod.read_config(ckpt_mod.list_checkpoints(run_dir)[-1]).train.get("checkpoint_every") or 0
    expected = set(range(every, max(present) + 1, every)) if every > 0 else set()
    return sorted(expected - present)


# ---------------------------------------------------------------------------------------- one step
@dataclass
class StepScore:
    """The metrics of one checkpoint step and where its grid is."""

    step: int
    checkpoint: Path
    record: CheckpointConfig
    metrics: dict[str, Any]
    grid: Image.Image
    grid_path: Path
    seconds: float

    @property
    def key(self) -> str:
        return checkpoint_key(self.checkpoint, self.record.saved_at)

    def summary(self) -> dict[str, Any]:
        """What the scores file and the best-checkpoint choice keep of this step (JSON values)."""
        return {"step": self.step, "checkpoint": str(self.checkpoint), "key": self.key,
                "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}}


class Evaluator:
    """Scores checkpoints of one run; the frozen components, held-out split, calibration and reference
    embeddings are loaded once for all of them."""

    def __init__(self, profile: Profile, settings: EvalSettings, first_checkpoint: Path,
                 device: str | None = None) -> None:
        self.profile, self.settings = profile, settings.check()
        self.device = pick_device(device)
        self.dtype = resolve_dtype("auto", self.device)
        self.base = load_for_sampling(first_checkpoint, profile=profile, device=self.device, use_ema=True,
                                      dtype=self.dtype)
        if self.base.config is None:
            raise EvaluationError(f"{first_checkpoint} has no config.json record: not a training run's checkpoint")
        self.held_out = held_out_split(self.base.config, profile)
        self.warnings: list[str] = []  # what the caller should tell the user
        if not len(self.held_out.val_idx):
            self.warnings.append(f"the run holds out no samples of {self.held_out.latents_dir} (train.val_share "
                                 f"{self.base.config.train.get('val_share')}): no validation ε-MSE")
        elif self.held_out.dataset.manifest_hash != self.base.config.manifest_hash:
            self.warnings.append(f"the latent cache {self.held_out.latents_dir} changed since the run trained "
                                 f"(manifest {self.held_out.dataset.manifest_hash}, the checkpoint records "
                                 f"{self.base.config.manifest_hash}): its held-out split may differ")
        self.calibration = None
        self.clip = None
        if uses_prompt_accuracy(profile):
            self.calibration = prompt_scorer.calibrate(profile.sample.height, settings.seeds_per_prompt,
                                                       vae=self.base.vae)
            if settings.inception_weights:
                self.warnings.append("inception_weights is ignored on the synthetic source: the Inception FID is "
                                     "an sd15 (CLIP-path) metric")
        else:
            self.clip = ClipReference.build(profile, self.base, self.held_out, settings, self.device)

    def _bundle(self, checkpoint: Path) -> SamplingBundle:
        """The first checkpoint's bundle with this checkpoint's EMA UNet swapped in."""
        if checkpoint == self.base.checkpoint:
            return self.base
        record = ckpt_mod.read_config(checkpoint)
        unet = ckpt_mod.load_unet(checkpoint, ema=True, device=self.device, dtype=self.dtype)
        return dataclasses.replace(self.base, unet=unet, checkpoint=checkpoint, step=record.step, config=record,
                                   ema=(checkpoint / ckpt_mod.EMA_FILE).exists())

    def score(self, checkpoint: Path) -> StepScore:
        """Every metric of one checkpoint (see the module docstring) and its grid, written to disk."""
        t0 = time.perf_counter()
        bundle = self._bundle(checkpoint)
        metrics: dict[str, Any] = {"ema_weights": bundle.ema}
        if len(self.held_out.val_idx):
            metrics.update(bucketed_eps_mse(bundle.unet, bundle.text_encoder, self.held_out,
                                            self.settings.eps_buckets, self.settings.eps_batch_size,
                                            bundle.noise_schedule()).as_metadata())
        else:  # a run with train.val_share 0 (or a tiny cache) has no held-out split to score
            metrics["val_samples"] = 0
        metrics["val_manifest_hash"] = self.held_out.dataset.manifest_hash
        if self.calibration is not None:
            metrics.update(self._prompt_accuracy(bundle))
        if self.clip is not None:
            metrics.update(self.clip.score(bundle, self.profile, self.settings.batch_size))
        rendered = render_grid(bundle, self.profile, self.settings.batch_size)
        grid_path = write_png(step_grid_path(self.profile.samples_dir, run_name(checkpoint), bundle.step),
                              rendered.grid)
        assert bundle.config is not None and bundle.step is not None  # checked in __init__ and read_config
        return StepScore(bundle.step, checkpoint, bundle.config, metrics, rendered.grid, grid_path,
                         time.perf_counter() - t0)

    def _prompt_accuracy(self, bundle: SamplingBundle) -> dict[str, float]:
        """Accuracy over the synthetic world's every (colour, shape, background) × seeds, with chance levels
        and the scorers' two ceilings."""
        cfg = self.profile.sample
        pairs = prompt_scorer.evaluation_set(self.settings.seeds_per_prompt)
        prompts = [p for p, _ in pairs]
        images = generate(bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, prompts,
                          seed=[s for _, s in pairs], scaling_factor=bundle.scaling_factor,
                          batch_size=self.settings.batch_size, max_length=bundle.max_length,
                          scheduler=bundle.sampler(), **sample_settings(cfg))
        acc = prompt_scorer.prompt_accuracy(images, prompts)
        assert self.calibration is not None
        return {**acc.as_metadata("accuracy/"), **{f"chance/{k}": round(v, 4) for k, v in acc.chance.items()},
                **self.calibration.as_metadata(), "accuracy_n": acc.n}


@dataclass
class ClipReference:
    """The sd15 metrics' fixed inputs: the CLIP model, held-out captions (token ids) and the CLIP embeddings of
    the held-out images (latents decoded by the frozen VAE); with ``inception_weights``, the FID Inception and
    the same images' pool3 features."""

    model: Any
    captions: list[str]
    token_ids: torch.Tensor
    reference_emb: torch.Tensor
    inception: inception_fid.InceptionReference | None = None

    @classmethod
    def build(cls, profile: Profile, bundle: SamplingBundle, held_out: HeldOut, settings: EvalSettings,
              device: torch.device) -> "ClipReference":
        # default: the text encoder's source; SD 1.x's (openai/clip-vit-large-patch14) holds the whole CLIP model
        source = settings.clip_model or component_sources(profile).text_encoder
        model = clipm.load_clip(source, device)
        indices = _spread(held_out.val_idx, settings.clip_prompts)
        captions = held_out_captions(held_out, indices)
        max_len = int(model.config.text_config.max_position_embeddings)
        ids = tokenize(bundle.tokenizer, captions, max_len)
        lat, _ = held_out.dataset.get_batch(indices)
        reference = decode_latents(bundle, torch.from_numpy(lat).float())
        inception = (inception_fid.InceptionReference.build(settings.inception_weights, reference, device)
                     if settings.inception_weights else None)
        return cls(model, captions, ids, clipm.image_embeddings(model, reference), inception)

    def score(self, bundle: SamplingBundle, profile: Profile, batch_size: int) -> dict[str, Any]:
        """CLIP score and CLIP-FD (and ``fid_inception``, on the same images) as materialisation metadata."""
        cfg = profile.sample
        images = generate(bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, self.captions,
                          seed=list(range(len(self.captions))), scaling_factor=bundle.scaling_factor,
                          batch_size=batch_size, max_length=bundle.max_length, scheduler=bundle.sampler(),
                          **sample_settings(cfg))
        metrics: dict[str, Any] = clipm.clip_metrics(self.model, images, self.token_ids,
                                                     self.reference_emb).as_metadata()
        if self.inception is not None:
            metrics["fid_inception"] = round(self.inception.fid(images), 4)
        return metrics


def _spread(indices: np.ndarray, k: int) -> np.ndarray:
    """``k`` evenly spread entries of ``indices`` (all of them when there are fewer)."""
    if len(indices) <= k:
        return np.asarray(indices)
    return np.asarray(indices)[np.linspace(0, len(indices) - 1, k).round().astype(np.int64)]


def held_out_captions(held_out: HeldOut, indices: Sequence[int]) -> list[str]:
    """The captions of ``indices`` of the cache (one parquet read per shard)."""
    ds = held_out.dataset
    tables: dict[int, list[str]] = {}
    out = []
    for i in indices:
        j, r = ds.locate(int(i))
        if j not in tables:
            tables[j] = read_shard_table(ds.cache_dir, ds.shards[j]).column("caption").to_pylist()
        out.append(str(tables[j][r]))
    return out


@torch.no_grad()
def decode_latents(bundle: SamplingBundle, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """Cached (scaled) latents → PIL images through the frozen VAE."""
    p = next(bundle.vae.parameters())
    out: list[Image.Image] = []
    for i in range(0, latents.shape[0], batch_size):
        z = (latents[i:i + batch_size] / bundle.scaling_factor).to(p.device, p.dtype)
        out.extend(latents_to_pil(bundle.vae.decode(z).sample.float()))
    return out


# ------------------------------------------------------------------------------------ best and file
def best_summary(summaries: Sequence[dict[str, Any]], metric: PrimaryMetric) -> dict[str, Any] | None:
    """The best of ``summaries`` (:meth:`StepScore.summary` dicts) by ``metric``; ties: lower validation
    ε-MSE, then the later step. None when no summary has a finite value of the metric."""
    def sort_key(s: dict[str, Any]) -> tuple[float, float, int]:
        value = float(s["metrics"][metric.name])
        return (-value if metric.higher_is_better else value, float(s["metrics"].get("val_eps_mse", math.inf)),
                -int(s["step"]))

    usable = [s for s in summaries if math.isfinite(float(s["metrics"].get(metric.name, math.nan)))]
    return min(usable, key=sort_key) if usable else None


def write_scores(run_dir: Path, summaries: Sequence[dict[str, Any]], metric: PrimaryMetric) -> Path:
    """``{run_dir}/eval_scores.json``: every scored step (step order) and the best one, written atomically."""
    ordered = sorted(summaries, key=lambda s: int(s["step"]))
    best = best_summary(ordered, metric)
    path = run_dir / SCORES_FILE
    write_json_atomic(path, {"format": SCORES_FORMAT, "primary_metric": metric.name,
                             "higher_is_better": metric.higher_is_better, "steps": ordered, "best": best})
    return path


def read_scores(run_dir: Path) -> dict[str, Any]:
    """The scores file of a run; :class:`EvaluationError` naming it when missing or unreadable."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} not found: the run has not been evaluated yet (materialise the "
                              f"checkpoint_eval asset for it)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: unreadable evaluation scores ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != SCORES_FORMAT or "steps" not in data:
        raise EvaluationError(f"{path}: not an evaluation scores file of format {SCORES_FORMAT}")
    return data


def best_checkpoint(run_dir: str | Path) -> Path:
    """The best-scored checkpoint of a run (by its scores file), which must still be on disk."""
    run = Path(run_dir)
    if (run / ckpt_mod.CONFIG_FILE).exists():  # a checkpoint directory: its run
        run = run.parent
    data = read_scores(run)
    best = data.get("best")
    if not best:
        raise EvaluationError(f"{run / SCORES_FILE}: no scored step has a finite {data.get('primary_metric')}")
    ckpt = run / ckpt_mod.step_dir_name(int(best["step"]))
    if not (ckpt / ckpt_mod.STATE_FILE).exists() and not (ckpt / ckpt_mod.EMA_FILE).exists():
        raise CheckpointError(f"the best checkpoint of {run} (step {best['step']}, by {data['primary_metric']}) "
                              f"is no longer on disk: {ckpt} (pruned by train.keep_last?)")
    return ckpt
