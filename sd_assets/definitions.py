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
)
