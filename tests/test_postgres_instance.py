"""Dagster at production settings (README.md, Scale-out): an instance on Postgres (dagster-postgres, a real
server started here: tests/postgres_support.py) whose run queue starts up to 3 runs at once. A daemon
executes the documented backfills of every `image_shards` and then every `latents` partition of a 6-shard
synthetic source; the runs overlap, every partition is materialised exactly once, no run logs a lock error,
the latent manifest lists every shard once (concurrent encodes commit under the manifest lock and must not
lose each other's entries), and `sd train` then trains on all of them. Last, the `gpu` pool: with
`dagster instance concurrency set gpu 1`, two `latents` runs execute their GPU steps one after the other.

Slow (12-14 min on the 2-core dev box with other jobs running: each run is a run worker plus a step process,
each importing torch and dagster; the VAE fit of the session's components adds ~1-2 min): `make test-slow`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from e2e_support import BIN, ROOT, WORKSPACE, dagster, env_for, make_home, process_group, write_run_config
from latents_support import install_components
from postgres_support import PostgresServer, postgres  # noqa: F401  (the module-scoped server fixture)
from sd_core.config import Profile
from sd_core.encoding.latent_cache import MANIFEST, read_manifest
from train_support import SMALL_UNET, train_argv

pytestmark = pytest.mark.slow

# 6 shard parts of <= 8 rows (the synthetic source plants rows the filter drops: 64 rows keep ~48).
SHARDS = 6
SOURCE = {"source": {"synthetic_rows": 64}, "download": {"shard_size": 8, "watchdog_s": 120}}
MAX_CONCURRENT_RUNS = 3
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
# What a lock problem looks like in a run's logs: SQLite's, Postgres', or the latent manifest's file lock.
LOCK_ERRORS = re.compile(r"database is locked|deadlock detected|could not obtain lock|lock timeout|"
                         r"LockNotAvailable|could not serialize access|Timeout.{0,80}lock|\.manifest\.lock",
                         re.IGNORECASE)
IMAGES, LATENTS = dg.AssetKey("image_shards"), dg.AssetKey("latents")


def production_dagster_yaml() -> str:
    """The dagster.yaml `python -m sd_assets.demo` generates, with its documented Postgres block uncommented
    (the server comes from the DAGSTER_PG_* variables it names) and the run queue at 3 (dequeued every second
    rather than every few, only to save test time)."""
    from sd_assets.demo import DAGSTER_YAML

    lines, in_block = [], False
    for line in DAGSTER_YAML.splitlines():
        if line == "# storage:" or (in_block and line.startswith("#   ")):
            in_block = True
            lines.append(line[2:])
            continue
        in_block = False
        lines.append(line)
    text = "\n".join(lines) + "\n"
    assert "storage:\n  postgres:\n    postgres_db:" in text, "the documented Postgres block is gone"
    assert "max_concurrent_runs: 2\n" in text
    return text.replace("max_concurrent_runs: 2\n", f"max_concurrent_runs: {MAX_CONCURRENT_RUNS}\n"
                                                    f"  dequeue_interval_seconds: 1\n")


@dataclass
class Deployment:
    """A Postgres-backed instance with the shard partitions registered, components built, a daemon running."""

    home: Path
    data_root: Path
    env: dict[str, str]
    instance: dg.DagsterInstance
    shards: list[str]
    daemon_log: Path

    def backfill(self, job: str, partitions: list[str], timeout: float = 600) -> list[dg.RunRecord]:
        """`dagster job backfill -w workspace.yaml -j JOB --partitions a,b,... --noprompt` (README,
        Operations), then wait for the daemon to finish its runs; returns their records."""
        before = {r.dagster_run.run_id for r in self.instance.get_run_records()}
        dagster("job", "backfill", "-w", "workspace.yaml", "-j", job, "--partitions", ",".join(partitions),
                "--noprompt", env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            new = [r for r in self.instance.get_run_records() if r.dagster_run.run_id not in before]
            if len(new) >= len(partitions) and all(r.dagster_run.status in TERMINAL for r in new):
                return new
            assert time.monotonic() < deadline, (
                f"{job} runs not finished in {timeout} s: "
                f"{[(r.dagster_run.tags.get('dagster/partition'), r.dagster_run.status) for r in new]}\n"
                f"daemon log:\n{self.daemon_log.read_text()[-4000:]}")
            time.sleep(2)


@pytest.fixture(scope="module")
def deployment(postgres: PostgresServer, tiny_built: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    """The shard parts cut by `filtered_metadata` (one `dagster asset materialize`, which registers the
    partitions in Postgres), the session's tiny components copied in, and `dagster-daemon run`."""
    base = tmp_path_factory.mktemp("pg-deploy")
    home = make_home(base / "dagster_home", production_dagster_yaml())
    data_root = base / "data"
    env = {**env_for(home, data_root), **postgres.env()}
    cfg = str(write_run_config(base / "run.yaml", data_root, SOURCE))
    dagster("asset", "materialize", "-m", "sd_assets.definitions", "--select", "laion_metadata,filtered_metadata",
            "-c", cfg, env=env)
    install_components(tiny_built, Profile.tiny(data_root))
    daemon_log = base / "daemon.log"
    with pytest.MonkeyPatch.context() as mp:  # this process reads the instance too: the same variables
        for k, v in postgres.env().items():
            mp.setenv(k, v)
        yield from _with_daemon(home, data_root, env, daemon_log)


def _with_daemon(home: Path, data_root: Path, env: dict[str, str], daemon_log: Path) -> Iterator[Deployment]:
    """The instance as this process sees it (on Postgres, with the shard partitions), and the daemon."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage", type(instance.run_storage)
        shards = sorted(instance.get_dynamic_partitions("shards"))
        assert len(shards) >= SHARDS, shards
        with process_group([str(BIN / "dagster-daemon"), "run", "-w", WORKSPACE], env, daemon_log):
            yield Deployment(home, data_root, env, instance, shards, daemon_log)


@dataclass
class Backfills:
    images: list[dg.RunRecord]
    latents: list[dg.RunRecord]
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def backfilled(deployment: Deployment) -> Backfills:
    """Every shard downloaded, then every shard encoded, each as one backfill executed by the daemon."""
    t0 = time.monotonic()
    images = deployment.backfill("shards_job", deployment.shards)
    t1 = time.monotonic()
    latents = deployment.backfill("encode_job", deployment.shards)
    return Backfills(images, latents, {"image_shards": round(t1 - t0, 1), "latents": round(time.monotonic() - t1, 1)})


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


def _materialisation_counts(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in instance.fetch_materializations(key, limit=10_000).records:
        counts[rec.partition_key] = counts.get(rec.partition_key, 0) + 1
    return counts


def test_backfills_succeed_and_materialise_every_shard_exactly_once(deployment, backfilled):
    for name, runs in (("image_shards", backfilled.images), ("latents", backfilled.latents)):
        failed = [(r.dagster_run.tags.get("dagster/partition"), r.dagster_run.status) for r in runs
                  if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
        assert not failed, f"{name}: {failed}"
        assert sorted(r.dagster_run.tags.get("dagster/partition") for r in runs) == deployment.shards
    for key in (IMAGES, LATENTS):
        assert _materialisation_counts(deployment.instance, key) == {s: 1 for s in deployment.shards}, key


def test_backfill_runs_overlap_up_to_the_queue_limit(backfilled):
    print(f"\nbackfill wall time (s): {backfilled.seconds}")
    for name, runs in (("image_shards", backfilled.images), ("latents", backfilled.latents)):
        intervals = [(r.start_time, r.end_time) for r in runs]
        assert all(s and e for s, e in intervals), f"{name}: a run without start/end time"
        most = _max_overlap(intervals)
        print(f"{name}: at most {most} runs at once")
        assert 2 <= most <= MAX_CONCURRENT_RUNS, f"{name}: at most {most} of {len(runs)} runs ran at once"


def _run_log_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Every message of a run's event log, with the error chains of failures."""
    parts = []
    for entry in instance.all_logs(run_id):
        parts.append(entry.user_message or "")
        err = getattr(entry.dagster_event, "event_specific_data", None) if entry.dagster_event else None
        error = getattr(err, "error", None)
        while error is not None:
            parts.append(error.message)
            error = error.cause
    return "\n".join(parts)


def test_no_run_logs_a_lock_error(deployment, backfilled):
    texts = {r.dagster_run.run_id: _run_log_text(deployment.instance, r.dagster_run.run_id)
             for r in backfilled.images + backfilled.latents}
    # the runs' captured stdout/stderr (compute logs, under DAGSTER_HOME/storage) and the daemon's log too
    captured = [f for f in deployment.home.rglob("*") if f.is_file() and f.suffix in {".out", ".err"}]
    assert captured, f"no compute logs under {deployment.home}"
    texts.update({str(f): f.read_text(errors="replace") for f in captured})
    texts["daemon"] = deployment.daemon_log.read_text(errors="replace")
    hits = {where: m.group(0) for where, text in texts.items() if (m := LOCK_ERRORS.search(text))}
    assert not hits, hits


def test_the_latent_manifest_lists_every_shard_exactly_once(deployment, backfilled):
    path = deployment.data_root / "latents" / MANIFEST
    pairs: list[tuple[str, object]] = []
    json.loads(path.read_text(), object_pairs_hook=lambda kv: pairs.extend(kv) or dict(kv))
    shard_keys = [k for k, v in pairs if isinstance(v, dict) and "count" in v]
    assert sorted(shard_keys) == deployment.shards  # no shard lost, none twice
    manifest = read_manifest(path.parent)
    assert not any("pending" in e for e in manifest.values())  # every commit finished
    # each entry is the one its run wrote: the count and content hash its materialisation reported
    reported = {rec.partition_key: (rec.asset_materialization.metadata["encoded"].value,
                                    rec.asset_materialization.metadata["content_hash"].value)
                for rec in deployment.instance.fetch_materializations(LATENTS, limit=100).records}
    assert {s: (manifest[s]["count"], manifest[s]["hash"]) for s in deployment.shards} == reported
    assert all(manifest[s]["count"] > 0 for s in deployment.shards)


def test_the_trainer_then_trains_on_every_shard(deployment, backfilled, tmp_path):
    # `sd train` on the latent cache the backfill wrote (a few steps of a small UNet)
    profile = Profile.tiny(deployment.data_root)
    out = tmp_path / "run"
    argv = train_argv(profile, out, max_steps=2, checkpoint_every=2, val_every=2, overrides=json.dumps(SMALL_UNET))
    res = subprocess.run([str(BIN / "sd"), "train", *argv], cwd=ROOT, env=deployment.env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    configs = sorted(out.glob("step_*/config.json"))
    assert configs, f"no checkpoint in {out}: {res.stdout[-2000:]}"
    record = json.loads(configs[-1].read_text())
    assert record["shards"] == deployment.shards
    assert record["manifest_hash"]


def _step_window(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    """(STEP_START, STEP_SUCCESS) timestamps of the run's `latents` step."""
    times: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is not None and ev.step_key == "latents" and ev.event_type in (dg.DagsterEventType.STEP_START,
                                                                            dg.DagsterEventType.STEP_SUCCESS):
            times[ev.event_type.value] = entry.timestamp
    assert set(times) == {"STEP_START", "STEP_SUCCESS"}, (run_id, times)
    return times["STEP_START"], times["STEP_SUCCESS"]


def test_the_gpu_pool_runs_gpu_steps_one_at_a_time(deployment, backfilled):
    # without a limit (the backfill above) the GPU steps of concurrent encode runs overlap
    unlimited = [_step_window(deployment.instance, r.dagster_run.run_id) for r in backfilled.latents]
    print(f"\nlatents steps at once without a gpu limit: {_max_overlap(unlimited)}")
    assert _max_overlap(unlimited) >= 2, f"no two GPU steps overlapped even without a limit: {unlimited}"
    #   dagster instance concurrency set gpu 1
    dagster("instance", "concurrency", "set", "gpu", "1", env=deployment.env)
    two = deployment.shards[:2]
    runs = deployment.backfill("encode_job", two)
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    (s1, e1), (s2, e2) = sorted(_step_window(deployment.instance, r.dagster_run.run_id) for r in runs)
    run_windows = sorted((r.start_time, r.end_time) for r in runs)
    print(f"runs: {run_windows}; steps: {[(s1, e1), (s2, e2)]}")
    assert e1 <= s2, f"the second GPU step started at {s2} before the first ended at {e1}"
    # how: the run queue kept the second run queued while the first held the pool's one slot
    daemon = deployment.daemon_log.read_text(errors="replace")
    blocked = [r.dagster_run.run_id for r in runs
               if f"Run {r.dagster_run.run_id} is blocked by global concurrency limits" in daemon]
    assert len(blocked) == 1, f"expected one run held back by the gpu pool, daemon log:\n{daemon[-3000:]}"
