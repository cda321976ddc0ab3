"""Partitions: one dynamic partition per shard, registered by `filtered_metadata` and the shard sensor."""

import dagster as dg

shards = dg.DynamicPartitionsDefinition(name="shards")
