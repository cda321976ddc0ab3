"""The Dagster code location: every asset, check, job, sensor and schedule of sd-pipeline."""

import dagster as dg

from sd_assets.assets import data, evaluation, latents, sampling, training
from sd_assets.automation import automation_sensor
from sd_assets.jobs import jobs
from sd_assets.resources import SDConfig
from sd_assets.schedules import schedules
from sd_assets.sensors import sensors

_modules = [data, latents, training, sampling, evaluation]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=jobs,
    sensors=[*sensors, automation_sensor],
    schedules=schedules,
    resources={"sd": SDConfig()},
    # Every run executes its steps one after another in the run's own process. The steps of a run are a chain
    # (a shard's image_shards -> latents; unet_checkpoint -> checkpoint_eval, sample_grid) whose heavy work is
    # already a subprocess (img2dataset, torchrun), so the multiprocess executor's per-step interpreter only added
    # start-up: loading this code location again (~5 s on a 2-core AMD EPYC Zen 3) and ~10 s per daemon-launched
    # shard run with two runs side by side. Parallelism comes from runs (the run queue's max_concurrent_runs).
    executor=dg.in_process_executor,
)
