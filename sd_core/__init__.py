"""sd_core: the Stable-Diffusion training library behind sd-pipeline. No Dagster imports here."""

__version__ = "0.1.0"
