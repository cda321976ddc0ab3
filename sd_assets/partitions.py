"""Partitions: one dynamic partition per shard, registered by `filtered_metadata` and the shard sensor, and
what every per-shard asset asks of them.

A partition key is input from outside: anyone with the instance can call
``instance.add_dynamic_partitions("shards", [...])`` with any string, and the assets splice it into file
names. So keys are checked against the filter's own format (`sd_core.paths.check_shard_key`) where they are
registered (`registrable_shards`) and again where a run reads one (`shard_partition_key`), and every path a
per-shard asset writes is checked to lie inside the data root (`refuse_writes_outside`) — all before any file
is touched.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import dagster as dg

from sd_core.paths import check_shard_key, inside_data_root

shards = dg.DynamicPartitionsDefinition(name="shards")


def unregistered_shards(instance: dg.DagsterInstance, keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that are not yet partitions of `shards`, in their order."""
    known = set(instance.get_dynamic_partitions(shards.name))
    return [k for k in keys if k not in known]


def registrable_shards(instance: dg.DagsterInstance, keys: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(the valid keys among ``keys`` that are not yet partitions, in their order; refused key → reason).
    The refused ones are for the caller to log: a file on disk with an odd name must not become a partition
    (its runs would build paths from it), but it must not go unnoticed either."""
    valid, refused = [], {}
    for key in keys:
        try:
            valid.append(check_shard_key(key))
        except ValueError as e:
            refused[key] = str(e)
    return unregistered_shards(instance, valid), refused


def _checked_key(key: str) -> str:
    """``key`` if it is a shard key, else a `dg.Failure` saying so (the run fails with the message, not a
    traceback, and nothing has been written)."""
    try:
        return check_shard_key(key)
    except ValueError as e:
        raise dg.Failure(f"refusing this {shards.name!r} partition: {e}. Nothing was read or written; remove the "
                         f"partition with `instance.delete_dynamic_partition({shards.name!r}, key)`.") from None


def shard_partition_key(context: dg.AssetExecutionContext) -> str:
    """The run's shard key, checked: the only way a per-shard asset should read ``context.partition_key``.
    An empty key reaches the asset as a run without one (Dagster treats ``""`` as no partition), so it gets the
    same refusal instead of Dagster's "Cannot access partition_key for a non-partitioned run"."""
    return _checked_key(context.partition_key if context.has_partition_key else "")


def refuse_writes_outside(key: str, data_root: Path, outputs: Callable[[], Iterable[Path]]) -> None:
    """A `dg.Failure` unless every path ``outputs()`` lists (the files shard ``key`` is about to write) lies
    inside ``data_root`` with symlinks resolved: a ``shards/`` folder or a ``latents/00001.npy`` that is a
    symlink to somewhere else is refused before the first byte is written. ``outputs`` is called here because
    the library's own path builders check too (`sd_core.paths.shard_file`): their refusal becomes the same
    `dg.Failure`."""
    try:
        for path in outputs():
            inside_data_root(path, data_root)
    except ValueError as e:
        raise dg.Failure(f"shard {key}: {e}. Nothing was written.") from None


def shard_input(key: str, path: Path, upstream: dg.AssetsDefinition) -> Path:
    """``path``, the file shard ``key`` is made from; a `dg.Failure` when ``key`` is not a shard key, or naming
    the asset that writes the file when it is missing (a partition run against another data root, or before its
    upstream ran)."""
    _checked_key(key)
    if not path.is_file():
        raise dg.Failure(f"shard {key}: {path} does not exist (materialise {upstream.key.to_user_string()} "
                         f"with the same data root first)")
    return path
