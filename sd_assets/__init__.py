"""sd_assets: the thin Dagster layer over sd_core (assets, resources, partitions, sensors, schedules)."""
