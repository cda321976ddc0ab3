"""Sensors: the shard sensor (new shards on disk → partitions + runs) and the automation sensor."""

import dagster as dg

sensors: list[dg.SensorDefinition] = []
