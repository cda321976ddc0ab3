"""`make demo`: materialise the whole asset graph through the `dagster` CLI, reusing what is already there.

    python -m sd_assets.demo [-c configs/tiny.yaml] [--data-root data]

Runs against a persistent instance in ``{data_root}/dagster_home`` (created with a ``dagster.yaml`` if
missing), in order:

1. the unpartitioned assets up to ``filtered_metadata`` (which registers the ``shards`` partitions);
2. per shard partition, the partitioned assets (``image_shards``, ``latents``), with unpartitioned assets
   they need (``frozen_components``) before them;
3. the unpartitioned assets downstream (``unet_checkpoint``, ``checkpoint_eval``, ``sample_grid``).

It ends with the grid's path and adherence score, and the per-attribute and whole-prompt accuracies of the
run's final and best checkpoints (``checkpoint_eval``).

The stages are derived from the asset graph, so this module names no asset except where it reads the
result. Each unpartitioned stage is one ``dagster asset materialize -m sd_assets.definitions --select ...
-c run_config.yaml`` subprocess (``asset materialize`` has no ``-w``; ``-m`` loads the same module that
``workspace.yaml`` names); the shard stage runs that command with ``--partition K`` once per shard, all in one
``python -m sd_assets.materialize_batch`` subprocess (one Dagster run per shard; the imports paid once).
Before each stage the instance is queried: an asset (partition) already
materialised with its current code version and with the settings it declares unchanged (the run config of
its latest materialisation against this one: `Freshness`), whose upstream did not run in this invocation,
is skipped, so a second ``make demo`` only prints the result, and one with other settings re-runs what they
change (and everything downstream of it). Partitioned assets ignore a re-run of unpartitioned
upstream assets (as ``AutomationCondition.on_missing`` does: a refreshed metadata table only adds shards).

Also:
    python -m sd_assets.demo --init-home     # create {data_root}/dagster_home/dagster.yaml and exit
    python -m sd_assets.demo --missing latents   # print missing shard keys, comma-separated (for backfills)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sd_assets.demo_report import StageRun, stage_lines
from sd_assets.materialize_batch import DEFS_MODULE, MARKER
from sd_assets.run_config import RunConfigError, load_run_config, run_profile, sd_resource_config

if TYPE_CHECKING:  # dagster is imported lazily: --init-home stays fast
    import dagster as dg

    from sd_core.config import Profile

REPO_ROOT = Path(__file__).resolve().parents[1]

DAGSTER_YAML = """\
# Dagster instance for sd-pipeline (written by `python -m sd_assets.demo`; edit freely, it is not rewritten).
# Storage: SQLite files in this folder. Several concurrent writers lock SQLite: for a shared or busy
# deployment (more concurrent runs) use Postgres (`pip install dagster-postgres`; README.md, Scale-out):
# uncomment this block and set the variables (tests/test_postgres_instance.py runs it with 3 runs at once).
# storage:
#   postgres:
#     postgres_db:
#       username: {env: DAGSTER_PG_USERNAME}
#       password: {env: DAGSTER_PG_PASSWORD}
#       hostname: {env: DAGSTER_PG_HOST}
#       port: {env: DAGSTER_PG_PORT}
#       db_name: {env: DAGSTER_PG_DB}
#       scheme: postgresql+psycopg2  # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3, not installed
telemetry:
  enabled: false
# Runs from the UI, backfills, sensors and schedules queue here; the daemon (`dagster dev`,
# `dagster-daemon run`) starts at most this many at once (on Postgres, 3 or more). GPU steps also take a
# slot of the `gpu` pool: `dagster instance concurrency set gpu 1` (a queued run whose GPU step would wait
# stays queued until a slot is free).
run_queue:
  max_concurrent_runs: 2
# The code location loads in 1-2 s (without torch), but a code server on a busy, slow machine can take far longer.
code_servers:
  local_startup_timeout: 300
"""


def ensure_dagster_home(home: Path) -> Path:
    """Create ``home`` with a ``dagster.yaml`` unless one exists (never overwrites a user's)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        tmp = cfg.with_suffix(".yaml.tmp")
        tmp.write_text(DAGSTER_YAML)
        tmp.replace(cfg)
    return home


class DemoBusy(RuntimeError):
    """Another demo holds the data root's lock."""


@contextlib.contextmanager
def demo_lock(home: Path) -> Iterator[None]:
    """One demo per data root at a time: a second would build the same components into the same folder and
    train beside the first on the same cores. An advisory ``flock`` on ``{home}/demo.lock``, which the kernel
    drops when its process dies, so a killed demo leaves no stale lock behind; the file names the holder."""
    with open(home / "demo.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise DemoBusy(f"another demo (pid {holder}) is running on {home.parent}: wait for it, or stop it "
                           "(Ctrl-C in its terminal); what it finished stays materialised") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


# ------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Stage:
    """Assets run together: all unpartitioned, or all on the ``shards`` partitions (one run per key)."""

    keys: tuple["dg.AssetKey", ...]
    partitioned: bool


def plan_stages(graph: Any) -> list[Stage]:
    """Topological order of the graph's materializable assets, grouped greedily into stages of equal
    partitioning (Kahn's algorithm that prefers an asset of the current stage's kind)."""
    keys = sorted(graph.materializable_asset_keys, key=lambda k: k.to_user_string())
    parted = {k: graph.get(k).partitions_def is not None for k in keys}
    deps = {k: {p for p in graph.get(k).parent_keys if p in parted} for k in keys}
    done: set[Any] = set()
    stages: list[Stage] = []
    current: list[Any] = []
    kind = False
    while len(done) < len(keys):
        ready = [k for k in keys if k not in done and k not in current and deps[k] <= done | set(current)]
        same = [k for k in ready if parted[k] == kind]
        if same:
            current.append(same[0])
            continue
        if not current and not ready:
            raise ValueError(f"cannot order assets {sorted(k.to_user_string() for k in set(keys) - done)}")
        if current:
            stages.append(Stage(tuple(current), kind))
            done |= set(current)
            current = []
        kind = not kind
    if current:
        stages.append(Stage(tuple(current), kind))
    return stages


class Freshness:
    """Answers "does (asset, partition) need a run?" from the instance, plus what ran in this invocation.

    Stale: never materialised, another code version, a settings change (the settings the asset declares with
    `sd_assets.resources.settings_read`, compared between the run config that made its latest materialisation
    and ``profile``: a model trained with configs/demo-fast.yaml does not pass for the demo's), or an
    upstream asset re-ran."""

    def __init__(self, instance: "dg.DagsterInstance", graph: Any, code_versions: dict[Any, str | None],
                 settings: dict[Any, tuple[str, ...]] | None = None, profile: "Profile | None" = None):
        self.instance, self.graph, self.code_versions = instance, graph, code_versions
        self.settings, self.profile = settings or {}, profile
        self.ran: set[tuple[Any, str | None]] = set()

    @classmethod
    def of(cls, instance: "dg.DagsterInstance", defs: Any, run_config: dict[str, Any]) -> "Freshness":
        """For a demo run with ``run_config``: every asset's code version and declared settings from ``defs``."""
        from sd_assets.resources import declared_settings

        specs = defs.resolve_all_asset_specs()
        return cls(instance, defs.resolve_asset_graph(), {s.key: s.code_version for s in specs},
                   {s.key: declared_settings(s.metadata) for s in specs}, run_profile(run_config))

    def latest(self, key: Any, partition: str | None) -> Any:
        import dagster as dg

        flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
        records = self.instance.fetch_materializations(flt, limit=1).records
        return records[0] if records else None

    def setting_changes(self, key: Any, record: Any) -> list[str]:
        """The settings ``key`` declares that differ between the run that made ``record`` and ``profile``."""
        from sd_core.config import ConfigError, setting_changes

        names = self.settings.get(key, ())
        run = self.instance.get_run_by_id(record.run_id) if names and self.profile is not None else None
        if run is None:  # nothing declared, or the run was deleted: no evidence of a change
            return []
        try:
            before = run_profile(run.run_config)
        except ConfigError as exc:  # e.g. a field this version no longer has
            return [f"the settings of run {run.run_id} no longer load ({exc})"]
        return setting_changes(before, self.profile, names)

    def needs_run(self, key: Any, partition: str | None) -> str | None:
        """The reason (asset, partition) must run, or None when it is up to date."""
        record = self.latest(key, partition)
        if record is None:
            return "missing"
        want = self.code_versions.get(key)
        have = (record.asset_materialization.tags or {}).get("dagster/code_version")
        if want is not None and have != want:
            return f"code version {have} -> {want}"
        if changes := self.setting_changes(key, record):
            more = f" (+{len(changes) - 3} more)" if len(changes) > 3 else ""
            return "settings changed: " + "; ".join(changes[:3]) + more
        for up in self.graph.get(key).parent_keys:
            up_parted = self.graph.has(up) and self.graph.get(up).partitions_def is not None
            if partition is not None and not up_parted:
                continue  # on_missing semantics: an upstream refresh adds shards, it does not redo them
            if partition is not None and (up, partition) in self.ran:
                return f"{up.to_user_string()} re-ran"
            if partition is None and any(k == up for k, _ in self.ran):
                return f"{up.to_user_string()} re-ran"
        return None

    def stage_todo(self, keys: tuple[Any, ...], partition: str | None) -> list[tuple[Any, str]]:
        """What of a stage's ``keys`` (in graph order) must run for ``partition``, with the reason: an asset whose
        parent in the same stage runs must run too (the instance cannot tell yet: it is asked before the
        stage starts), or a re-trained checkpoint would leave the old grid and scores standing as its own."""
        todo: list[tuple[Any, str]] = []
        for key in keys:
            parents = self.graph.get(key).parent_keys
            reason = self.needs_run(key, partition) or next(
                (f"{up.to_user_string()} re-runs" for up, _ in todo if up in parents), None)
            if reason:
                todo.append((key, reason))
        return todo


# ------------------------------------------------------------------------------------------- running
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DAGSTER_LINE = re.compile(r"^\S+ \S+ \S+ - dagster - (\w+) - [^ ]+ - [0-9a-f-]{36} - (.*)$")
_SHOWN_EVENTS = ("STEP_FAILURE", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION", "RUN_FAILURE")


def _progress_line(line: str) -> str | None:
    """The part of a CLI output line worth showing, or None (debug events, warnings noise)."""
    m = _DAGSTER_LINE.match(_ANSI.sub("", line).rstrip())
    if not m:
        return None
    level, rest = m.groups()
    parts = rest.split(" - ")
    if level != "DEBUG" or any(e in parts[:3] for e in _SHOWN_EVENTS):
        if parts and parts[0].isdigit():  # drop the pid column
            parts = parts[1:]
        return " - ".join(parts)[:300]
    return None


def run_cli(args: list[str], env: dict[str, str], log_path: Path, quiet_s: float = 30.0,
            on_marker: Callable[[str], None] | None = None) -> None:
    """Run one `dagster` CLI command, showing progress lines and a heartbeat; the full output goes to
    ``log_path``. Lines from `sd_assets.materialize_batch` (``sd-batch: ...``) go to ``on_marker``.
    Raises SystemExit with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    last_shown = [t0]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(5.0):
                if time.monotonic() - last_shown[0] >= quiet_s:
                    print(f"      ... still running ({time.monotonic() - t0:.0f} s)", flush=True)
                    last_shown[0] = time.monotonic()

        threading.Thread(target=heartbeat, daemon=True).start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if on_marker is not None and line.startswith(MARKER):
                    on_marker(line[len(MARKER):].strip())
                    last_shown[0] = time.monotonic()
                    continue
                shown = _progress_line(line)
                if shown:
                    print(f"      {shown}", flush=True)
                    last_shown[0] = time.monotonic()
            rc = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, 15)
            proc.wait()
            raise
        finally:
            stop.set()
    if rc != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise SystemExit("\n".join(tail) + f"\n\nFAILED (exit {rc}): {' '.join(args)}\nfull log: {log_path}")


@dataclass
class Demo:
    data_root: Path
    run_config: dict[str, Any]
    dagster: str = str(Path(sys.executable).with_name("dagster"))

    @property
    def home(self) -> Path:
        return self.data_root / "dagster_home"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(DAGSTER_HOME=str(self.home), SD_DATA_ROOT=str(self.data_root), NO_ALBUMENTATIONS_UPDATE="1")
        # The code location reads the profile from the environment at load time (latents' code version
        # depends on it): load it with the profile the run config selects.
        profile = sd_resource_config(self.run_config).get("profile")
        if profile:
            env["SD_PROFILE"] = profile
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("WANDB_MODE", "offline")
        return env

    def materialize(self, keys: Iterable[Any], partitions: Sequence[str | None], config_path: Path, log: Path,
                    on_marker: Callable[[str], None] | None = None) -> None:
        """Unpartitioned assets: one `dagster asset materialize`. Shard partitions: the same command once per
        partition, all in one `sd_assets.materialize_batch` process (one run each; the imports paid once)."""
        select = ",".join(k.to_user_string() for k in keys)
        if list(partitions) == [None]:
            args = [self.dagster, "asset", "materialize", "-m", DEFS_MODULE, "--select", select, "-c", str(config_path)]
        else:
            args = [sys.executable, "-m", "sd_assets.materialize_batch", "-m", DEFS_MODULE, "--select", select,
                    "-c", str(config_path)]
            args += [a for part in partitions for a in ("--partition", str(part))]
        run_cli(args, self.env(), log, on_marker=on_marker)

    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        ensure_dagster_home(self.home)
        os.environ.update({k: v for k, v in self.env().items() if k in ("DAGSTER_HOME", "SD_DATA_ROOT", "SD_PROFILE")})
        import importlib

        import dagster as dg

        from sd_assets.partitions import shards

        defs = importlib.import_module(DEFS_MODULE).defs
        graph = defs.resolve_asset_graph()
        stages = plan_stages(graph)
        config_path = self.home / "demo_run_config.yaml"
        config_path.write_text(yaml.safe_dump(self.run_config, sort_keys=False))
        logs = self.data_root / "logs" / time.strftime("demo-%Y%m%d-%H%M%S")
        print(f"sd-pipeline demo: data root {self.data_root}, DAGSTER_HOME {self.home}")
        print("stages: " + " -> ".join(
            ("[shard] " if s.partitioned else "") + ",".join(k.to_user_string() for k in s.keys) for s in stages))
        runs: list[StageRun] = []
        with dg.DagsterInstance.get() as instance:
            fresh = Freshness.of(instance, defs, self.run_config)
            for i, stage in enumerate(stages, 1):
                partitions: list[str | None] = (
                    list(instance.get_dynamic_partitions(shards.name)) if stage.partitioned else [None])
                runs.append(StageRun(("[shard] " if stage.partitioned else "")
                                     + ",".join(k.to_user_string() for k in stage.keys)))
                if stage.partitioned and not partitions:
                    print(f"[{i}/{len(stages)}] no shard partitions registered: nothing to do for "
                          + ",".join(k.to_user_string() for k in stage.keys))
                todos = {part: fresh.stage_todo(stage.keys, part) for part in partitions}
                for part in partitions:
                    if not todos[part]:
                        print(f"[{i}/{len(stages)}]{_where(part, partitions)} up to date: "
                              + ",".join(k.to_user_string() for k in stage.keys))
                for group in _batches(partitions, todos):
                    self._run_batch(f"[{i}/{len(stages)}]", group, partitions, todos, fresh, runs[-1],
                                    config_path, logs / f"{i:02d}-{_log_name(group, todos)}.log")
            result = summarize(stages, fresh)
            result["evaluation"] = evaluation_summary(instance)
        result["stages"] = runs
        result["total_s"] = time.monotonic() - t_start
        return result

    def _run_batch(self, label: str, group: list[str | None], partitions: list[str | None],
                   todos: dict[str | None, list[tuple[Any, str]]], fresh: Freshness, stage_run: StageRun,
                   config_path: Path, log: Path) -> None:
        """Materialise one group of partitions (same assets to run), announcing each partition as it starts
        and ends, then record what ran for the summary."""
        keys = [k for k, _ in todos[group[0]]]
        names = ",".join(k.to_user_string() for k in keys)
        pending = list(group)

        def announce(part: str | None) -> None:
            reasons = "; ".join(f"{k.to_user_string()}: {r}" for k, r in todos[part])
            print(f"{label}{_where(part, partitions)} materializing {names} ({reasons})", flush=True)

        def on_marker(line: str) -> None:  # "partition K done in S s" or "partition K failed: ..."
            m = re.fullmatch(r"partition (\S+) done in (\d+) s", line)
            if not m or m[1] not in pending:
                print(f"      {line}", flush=True)
                return
            pending.remove(m[1])
            print(f"{label}{_where(m[1], partitions)} done in {m[2]} s", flush=True)
            if pending:
                announce(pending[0])

        announce(group[0])
        t0 = time.monotonic()
        self.materialize(keys, group, config_path, log, on_marker)
        stage_run.seconds += time.monotonic() - t0
        for part in group:
            fresh.ran |= {(k, part) for k in keys}
            stage_run.partitions += 1
            for k in keys:
                if (record := fresh.latest(k, part)) is not None:
                    stage_run.add(k.to_user_string(), _values(record))
        if group == [None]:
            print(f"{label} done in {time.monotonic() - t0:.0f} s", flush=True)


def _where(part: str | None, partitions: list[str | None]) -> str:
    return f" shard {part} ({partitions.index(part) + 1}/{len(partitions)})" if part is not None else ""


def _batches(partitions: list[str | None], todos: dict[str | None, list[tuple[Any, str]]]) -> list[list[str | None]]:
    """Consecutive partitions that run the same assets, as one batch each (partitions up to date left out)."""
    groups: list[list[str | None]] = []
    for part in partitions:
        if not todos[part]:
            continue
        if groups and [k for k, _ in todos[groups[-1][-1]]] == [k for k, _ in todos[part]]:
            groups[-1].append(part)
        else:
            groups.append([part])
    return groups


def _log_name(group: list[str | None], todos: dict[str | None, list[tuple[Any, str]]]) -> str:
    names = "+".join(k.to_user_string() for k, _ in todos[group[0]])
    if group == [None]:
        return names
    return f"{names}-{group[0]}" + (f"..{group[-1]}" if len(group) > 1 else "")


def summarize(stages: list[Stage], fresh: Freshness) -> dict[str, Any]:
    """Where the last asset's output is and what it scored, from its latest materialization's metadata
    (`sample_grid`: ``grid_path``, ``adherence``, ``adherence_chance``)."""
    last = stages[-1].keys[-1] if stages else None
    out: dict[str, Any] = {"asset": last.to_user_string() if last else None, "metadata": {}}
    record = fresh.latest(last, None) if last is not None and not stages[-1].partitioned else None
    if record is None:
        return out
    meta = {k: getattr(v, "value", v) for k, v in (record.asset_materialization.metadata or {}).items()}
    out["metadata"] = meta
    out["path"] = meta.get("grid_path") or meta.get("path")
    out["score"], out["chance"] = meta.get("adherence"), meta.get("adherence_chance")
    return out


EVAL_ASSET = "checkpoint_eval"
ATTRIBUTES = ("colour", "shape", "background", "whole")


def _values(record: Any) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in (record.asset_materialization.metadata or {}).items()}


def evaluation_summary(instance: "dg.DagsterInstance") -> dict[str, Any] | None:
    """The final and the best checkpoint of the latest evaluated run, each with its metrics, from the
    ``checkpoint_eval`` materialisations (one per step; the newest names ``best_step``). None before any."""
    import dagster as dg

    records = instance.fetch_materializations(dg.AssetKey(EVAL_ASSET), limit=1000).records  # newest first
    if not records:
        return None
    latest = _values(records[0])
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        md = _values(record)
        if md.get("run_dir") == latest.get("run_dir"):
            by_step.setdefault(int(md["checkpoint_step"]), md)
    final = by_step[max(by_step)]
    return {"run_dir": latest.get("run_dir"), "metric": latest.get("best_metric"), "final": final,
            "best": by_step.get(latest.get("best_step"))}


def _step_line(label: str, md: dict[str, Any]) -> str:
    """One checkpoint's scores: per-attribute and whole-prompt accuracy (tiny) or CLIP score / CLIP-FD."""
    head = f"  {label} step {md['checkpoint_step']}: "
    if "accuracy/whole" in md:
        names = {"whole": "whole prompt"}
        return head + ", ".join(f"{names.get(a, a)} {md[f'accuracy/{a}']:.0%}" for a in ATTRIBUTES)
    return head + f"CLIP score {md.get('clip_score', float('nan')):.2f}, CLIP-FD {md.get('clip_fd', float('nan')):.2f}"


def evaluation_lines(summary: dict[str, Any] | None) -> list[str]:
    """What `make demo` prints about checkpoint_eval: the final and best checkpoints' scores, with the chance
    levels and the scorers' ceilings (true renders, VAE reconstructions) when the profile has them."""
    if not summary:
        return []
    final, best = summary["final"], summary["best"]
    lines = [f"{EVAL_ASSET}: {summary['run_dir']} (best by {summary['metric']})", _step_line("final", final)]
    if best is not None:
        lines.append(_step_line("best ", best))
    if "accuracy/whole" in final:
        for label, prefix in (("chance", "chance/"), ("ceiling, true renders", "ceiling/true_renders/"),
                              ("ceiling, VAE reconstructions", "ceiling/vae/")):
            if f"{prefix}whole" in final:
                lines.append(f"  {label}: " + ", ".join(f"{a} {final[prefix + a]:.0%}" for a in ATTRIBUTES))
    return lines


def missing_partitions(asset: str, data_root: Path) -> list[str]:
    """Shard keys of ``asset`` that have never been materialised (for `dagster job backfill --partitions`)."""
    os.environ.setdefault("DAGSTER_HOME", str(ensure_dagster_home(data_root / "dagster_home")))
    import dagster as dg

    from sd_assets.partitions import shards
    from sd_core.paths import is_shard_key

    with dg.DagsterInstance.get() as instance:
        done = instance.get_materialized_partitions(dg.AssetKey(asset))
        # keys that are not shard keys (registered by hand) would only be refused by the backfill's runs
        return [k for k in instance.get_dynamic_partitions(shards.name) if k not in done and is_shard_key(k)]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sd_assets.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", action="append", default=[],
                    help="run config YAML (repeatable, later files win); default configs/tiny.yaml")
    ap.add_argument("--data-root", default=None,
                    help="data root (default: the config's sd.data_root, else $SD_DATA_ROOT, else ./data)")
    ap.add_argument("--init-home", action="store_true", help="only create {data_root}/dagster_home/dagster.yaml")
    ap.add_argument("--missing", metavar="ASSET", help="print the ASSET's missing shard keys, comma-separated")
    return ap.parse_args(argv)


def _run_config(configs: list[Any], data_root_arg: str | None) -> tuple[dict[str, Any], Path]:
    """The merged run config with its data root resolved (flag, config, environment, ./data)."""
    run_config = load_run_config(configs)  # its errors name the file
    try:
        sd = sd_resource_config(run_config)
    except RunConfigError as exc:  # a problem of the merged files
        raise RunConfigError(f"{', '.join(map(str, configs))}: {exc}") from None
    root = data_root_arg or sd.get("data_root") or os.environ.get("SD_DATA_ROOT") or "data"
    if not isinstance(root, str):
        raise RunConfigError(f"{', '.join(map(str, configs))}: resources.sd.config.data_root must be a path, "
                             f"got {type(root).__name__}")
    data_root = Path(root).expanduser().resolve()
    sd["data_root"] = str(data_root)
    return run_config, data_root


def _print_result(result: dict[str, Any], data_root: Path) -> None:
    print()
    print(f"done in {result['total_s'] / 60:.1f} min ({result['total_s']:.0f} s)")
    if result.get("path"):
        print(f"{result['asset']}: {result['path']}")
    if isinstance(result.get("score"), (int, float)):
        chance = result.get("chance")
        print(f"prompt adherence: {result['score']:.0%}" + (f" (chance {chance:.0%})" if chance else ""))
    for line in [*evaluation_lines(result.get("evaluation")), *stage_lines(result["stages"])]:
        print(line)
    print(f"UI: make dev (DAGSTER_HOME={data_root / 'dagster_home'})")


def main(argv: list[str] | None = None) -> int:
    from sd_core.config import ConfigError

    args = _arguments(argv)
    configs = args.config or [REPO_ROOT / "configs" / "tiny.yaml"]
    try:  # settings that do not load are refused before anything is created or started, naming the files
        run_config, data_root = _run_config(configs, args.data_root)
        if not (args.init_home or args.missing):
            run_profile(run_config)
        home = ensure_dagster_home(data_root / "dagster_home")
    except RunConfigError as exc:
        print(f"sd-pipeline demo: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"sd-pipeline demo: {', '.join(map(str, configs))}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sd-pipeline demo: cannot create {data_root / 'dagster_home'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.init_home or args.missing:
        print(home if args.init_home else ",".join(missing_partitions(args.missing, data_root)))
        return 0
    try:
        with demo_lock(home):
            result = Demo(data_root, run_config).run()
    except DemoBusy as exc:
        print(f"sd-pipeline demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the running stage was stopped; `make demo` again continues from what is materialised")
        return 130
    _print_result(result, data_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
