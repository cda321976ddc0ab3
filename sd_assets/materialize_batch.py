"""Run ``dagster asset materialize`` once per shard partition, all in one interpreter.

    python -m sd_assets.materialize_batch --select image_shards,latents -c run_config.yaml \
        --partition 00000 --partition 00001

Why: each partition stays its own Dagster run (own metadata, own run in the UI, the same command a user would
type), but a fresh ``dagster`` process per partition pays the interpreter, torch, the code location,
img2dataset and diffusers imports again: ~5 s of a ~15 s shard run on a 2-core Intel Xeon, more on slower
CPUs (BENCHMARKS.md, session 15). Here they are paid once. `make demo` uses it for the shard stage.

After each partition it prints ``sd-batch: partition K done in S s`` (the demo reads that line). It stops at
the first partition that fails, as separate commands run one after another would, and exits non-zero naming it.
A run config file that does not load (unreadable, not YAML, settings out of range) is refused first, in one line
naming it, with exit code 2 and no run started (`config_refusal`).
"""

from __future__ import annotations

import argparse
import sys
import time

MARKER = "sd-batch: "
DEFS_MODULE = "sd_assets.definitions"


def materialize_partitions(select: str, config: str, partitions: list[str], module: str = DEFS_MODULE) -> int:
    """Materialise ``select`` for each partition in turn through the Dagster CLI's own command; 0 on success."""
    import click
    from dagster import DagsterError
    from dagster._cli import cli  # the `dagster` command itself: the same code path as the CLI

    for partition in partitions:
        t0 = time.monotonic()
        args = ["asset", "materialize", "-m", module, "--select", select, "-c", config, "--partition", partition]
        try:
            cli.main(args, prog_name="dagster", standalone_mode=False, auto_envvar_prefix="DAGSTER")
        except click.ClickException as e:  # "Materialization failed." and bad options: the run's log says why
            print(f"{MARKER}partition {partition} failed: {e.format_message()}", flush=True)
            return 1
        except DagsterError as e:  # e.g. a key that is not a registered shard partition, an unknown asset
            print(f"{MARKER}partition {partition} failed: {type(e).__name__}: {e}", flush=True)
            return 1
        print(f"{MARKER}partition {partition} done in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_assets.materialize_batch", description=__doc__.splitlines()[0])
    p.add_argument("--select", required=True, help="asset keys, comma-separated (as `dagster asset materialize`)")
    p.add_argument("-c", "--config", required=True, help="run config YAML file")
    p.add_argument("--partition", action="append", required=True, help="a partition key; repeat for several")
    p.add_argument("-m", "--module", default=DEFS_MODULE, help=f"the code location module (default {DEFS_MODULE})")
    a = p.parse_args(argv)
    refusal = config_refusal(a.config)
    if refusal:
        print(f"{MARKER}{refusal}", file=sys.stderr)
        return 2
    return materialize_partitions(a.select, a.config, a.partition, a.module)


def config_refusal(path: str) -> str | None:
    """Why the run config file at ``path`` cannot run (naming it), or None: checked once here, instead of in
    the first partition's run."""
    from sd_assets.run_config import RunConfigError, load_run_config, run_profile
    from sd_core.config import ConfigError

    try:
        run_config = load_run_config([path])
    except RunConfigError as exc:  # names the file
        return str(exc)
    try:
        run_profile(run_config)
    except ConfigError as exc:
        return f"{path}: {exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
