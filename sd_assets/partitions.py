"""Partitions: one dynamic partition per shard, registered by `filtered_metadata` and the shard sensor, and
what every per-shard asset asks of them."""

from collections.abc import Iterable
from pathlib import Path

import dagster as dg

shards = dg.DynamicPartitionsDefinition(name="shards")


def unregistered_shards(instance: dg.DagsterInstance, keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that are not yet partitions of `shards`, in their order."""
    known = set(instance.get_dynamic_partitions(shards.name))
    return [k for k in keys if k not in known]


def shard_input(key: str, path: Path, upstream: dg.AssetsDefinition) -> Path:
    """``path``, the file shard ``key`` is made from; a `dg.Failure` naming the asset that writes it when it
    is missing (a partition run against another data root, or before its upstream ran)."""
    if not path.is_file():
        raise dg.Failure(f"shard {key}: {path} does not exist (materialise {upstream.key.to_user_string()} "
                         f"with the same data root first)")
    return path
