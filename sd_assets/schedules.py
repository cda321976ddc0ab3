"""Schedules: incremental re-encoding of missing or stale latent shards."""

import dagster as dg

schedules: list[dg.ScheduleDefinition] = []
