"""The sample grid: fixed prompts × fixed seeds from one checkpoint, as one labelled PNG.

Why fixed prompts and seeds: two grids of two checkpoints are then directly comparable (row r is prompt r,
column c uses seed ``seeds[c]``). `render_grid` renders it from a loaded checkpoint (also used per step by
`checkpoint_eval`). The grid is written to ``samples/{run}/grid.png`` plus a
``grid_step_XXXXXXXX.png`` copy per checkpoint step, so earlier grids of a run stay around. For the tiny
profile the prompt-adherence score (`sd_core.sampling.adherence`) comes with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sd_core.atomic import write_atomic
from sd_core.config import Profile
from sd_core.sampling.adherence import AdherenceResult, adherence
from sd_core.sampling.generate import (SamplingBundle, generate, image_grid, load_for_sampling, pick_device,
                                       resolve_dtype, sample_settings)
from sd_core.training.checkpoint import CheckpointConfig, CheckpointError, latest_checkpoint


@dataclass
class SampleGrid:
    """What `make_sample_grid` produced."""

    grid: Image.Image
    grid_path: Path
    images: list[Image.Image]
    prompts: list[str]  # per image (prompt-major)
    seeds: list[int]  # per image
    checkpoint: Path
    step: int | None
    ema: bool
    run: str
    seconds: float
    checkpoint_config: CheckpointConfig | None  # the trainer's config.json: lineage (manifest hash, shards, ...)
    adherence: AdherenceResult | None  # tiny profile only


def find_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``checkpoints_dir``: the ``latest`` of the most recently updated run."""
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


def run_name(ckpt_dir: Path) -> str:
    """``{run}`` for ``samples/{run}/``: the run directory's name (the parent of ``step_XXXXXXXX``)."""
    if ckpt_dir.name.startswith("step_"):
        return ckpt_dir.parent.name
    return ckpt_dir.stem


def grid_is_valid(path: Path, size: tuple[int, int]) -> bool:
    """``path`` is a readable PNG of ``size`` (what the `grid_exists` check asserts)."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.size == tuple(size) and im.format == "PNG"
    except Exception:  # noqa: BLE001 - any unreadable file fails the check
        return False


@dataclass
class RenderedGrid:
    """The fixed prompts × seeds of ``profile.sample`` rendered from one loaded checkpoint."""

    grid: Image.Image
    images: list[Image.Image]
    prompts: list[str]  # per image (prompt-major)
    seeds: list[int]  # per image
    seconds: float


def render_grid(bundle: SamplingBundle, profile: Profile, batch_size: int = 16) -> RenderedGrid:
    """Render ``profile.sample``'s prompts × seeds with a loaded checkpoint (DDIM + CFG) into one labelled grid
    (row r = prompt r, column c = seed c); used by `sample_grid` and, per checkpoint step, `checkpoint_eval`."""
    cfg = profile.sample
    t0 = time.perf_counter()
    prompts = list(cfg.prompts)
    seeds = list(cfg.seeds)
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    images = generate(
        bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.vae, all_prompts, seed=all_seeds,
        scaling_factor=bundle.scaling_factor, batch_size=batch_size, max_length=bundle.max_length,
        scheduler=bundle.sampler(), **sample_settings(cfg),
    )
    grid = image_grid(images, rows=len(prompts), labels=prompts)
    return RenderedGrid(grid, images, all_prompts, all_seeds, time.perf_counter() - t0)


def step_grid_path(samples_dir: Path, run: str, step: int) -> Path:
    """Where the grid of checkpoint ``step`` of ``run`` is kept: ``samples/{run}/grid_step_XXXXXXXX.png``."""
    return samples_dir / run / f"grid_step_{step:08d}.png"


def write_png(path: Path, image: Image.Image) -> Path:
    write_atomic(path, lambda f: image.save(f, format="PNG"))
    return path


def make_sample_grid(checkpoint: Path, profile: Profile, batch_size: int = 16) -> SampleGrid:
    """Render ``profile.sample``'s prompts × seeds from ``checkpoint``'s EMA weights (DDIM + CFG) and write
    the grid under ``profile.samples_dir``."""
    t0 = time.perf_counter()
    device = pick_device()
    bundle = load_for_sampling(checkpoint, profile=profile, device=device, use_ema=True,
                               dtype=resolve_dtype("auto", device))
    rendered = render_grid(bundle, profile, batch_size)
    seconds = time.perf_counter() - t0
    run = run_name(bundle.checkpoint)
    grid_path = write_png(profile.samples_dir / run / "grid.png", rendered.grid)
    if bundle.step is not None:
        write_png(step_grid_path(profile.samples_dir, run, bundle.step), rendered.grid)
    return SampleGrid(
        grid=rendered.grid, grid_path=grid_path, images=rendered.images, prompts=rendered.prompts,
        seeds=rendered.seeds, checkpoint=bundle.checkpoint, step=bundle.step, ema=bundle.ema, run=run,
        seconds=seconds, checkpoint_config=bundle.config,
        adherence=adherence(rendered.images, rendered.prompts) if profile.name == "tiny" else None,
    )
