"""The per-shard commands of README.md (Operations), run as written against a temporary instance and data root:
one shard with `dagster asset materialize`, "everything missing" (`python -m sd_assets.demo --missing`) fed to
the several-shards command `dagster job backfill` (executed by a `dagster-daemon run` started here), and the
automation sensor's on_missing behaviour."""

from __future__ import annotations

import subprocess
import sys
import time

import dagster as dg

from e2e_support import (BIN, QUEUED_INSTANCE, ROOT, WORKSPACE, dagster, env_for, make_home, process_group,
                         write_run_config)

# 3 shard partitions of <= 20 rows. Only image_shards runs here (the cheapest per-shard asset); the same
# commands with latents / encode_job are run by tests/test_demo.py on the demo's data.
SMALL = {"source": {"synthetic_rows": 60}, "download": {"shard_size": 20, "watchdog_s": 60}}
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _wait_for_runs(instance: dg.DagsterInstance, n: int, timeout: float, log) -> list[dg.DagsterRun]:
    """Wait until ``n`` runs exist and all have finished; return them."""
    deadline = time.monotonic() + timeout
    while True:
        runs = instance.get_runs()
        if len(runs) >= n and all(r.status in TERMINAL for r in runs):
            return runs
        assert time.monotonic() < deadline, (f"runs not finished in {timeout} s: "
                                             f"{[(r.job_name, r.tags.get('dagster/partition'), r.status) for r in runs]}"
                                             f"\ndaemon log:\n{log.read_text()[-4000:]}")
        time.sleep(2)


def test_documented_shard_commands(tmp_path):
    home = make_home(tmp_path / "dagster_home", QUEUED_INSTANCE)
    data_root = tmp_path / "data"
    env = env_for(home, data_root)
    cfg = str(write_run_config(tmp_path / "run.yaml", data_root, SMALL))

    # The metadata, filtered into shard parts (registers the shard partitions).
    dagster("asset", "materialize", "-m", "sd_assets.definitions",
            "--select", "laion_metadata,filtered_metadata", "-c", cfg, env=env)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        shards = sorted(instance.get_dynamic_partitions("shards"))
        assert len(shards) == 3, shards
        first, several = shards[0], shards[1:]
        images = dg.AssetKey("image_shards")

        # One shard:
        #   dagster asset materialize -m sd_assets.definitions --select image_shards --partition KEY
        dagster("asset", "materialize", "-m", "sd_assets.definitions", "--select", "image_shards",
                "--partition", first, "-c", cfg, env=env)
        assert instance.get_materialized_partitions(images) == {first}

        # Everything missing: the shard keys without image_shards, comma-separated ...
        missing = subprocess.run([sys.executable, "-m", "sd_assets.demo", "--missing", "image_shards",
                                  "--data-root", str(data_root)], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=120, check=True).stdout.strip()
        assert missing == ",".join(several), missing

        # ... fed to the several-shards command: one queued run per shard, executed by the daemon.
        #   dagster job backfill -w workspace.yaml -j shards_job --partitions a,b --noprompt
        daemon_log = tmp_path / "daemon.log"
        with process_group([str(BIN / "dagster-daemon"), "run", "-w", WORKSPACE], env, daemon_log):
            n_before = len(instance.get_runs())
            dagster("job", "backfill", "-w", "workspace.yaml", "-j", "shards_job", "--partitions", missing,
                    "--noprompt", env=env)
            runs = _wait_for_runs(instance, n_before + len(several), 420, daemon_log)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
        assert {r.tags.get("dagster/partition") for r in runs[: len(several)]} == set(several)
        assert instance.get_materialized_partitions(images) == set(shards)
        # each run executed its step in its own process (the code location's in-process executor): no step
        # worker re-loaded the code location
        starting = dg.DagsterEventType.STEP_WORKER_STARTING
        workers = [e for r in runs for e in instance.all_logs(r.run_id, of_type=starting)]
        assert workers == [], [e.message for e in workers]


def test_automation_sensor_fills_each_new_shard_once():
    """`sd_automation_sensor` (stopped until switched on) over the assets' `on_missing` conditions: a shard
    partition added after the first tick is requested once; existing shards and upstream refreshes are not."""
    from sd_assets.automation import automation_sensor
    from sd_assets.definitions import defs

    assert automation_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    targeted = automation_sensor.asset_selection.resolve(defs.resolve_asset_graph())
    images = dg.AssetKey("image_shards")
    assert images in targeted
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["00000"])
        for key in ("laion_metadata", "filtered_metadata"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key))
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # the first tick records a baseline

        instance.add_dynamic_partitions("shards", ["00001"])
        second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert second.get_requested_partitions(images) == {"00001"}

        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="filtered_metadata"))
        third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
        assert third.get_requested_partitions(images) == set()
