"""Helpers for the end-to-end tests: a throwaway Dagster instance, `dagster` CLI calls, a webserver and a
daemon as process groups that are always killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKSPACE = str(ROOT / "workspace.yaml")
DEFS_MODULE = "sd_assets.definitions"
LOCATION = "sd_pipeline"

# Runs start as soon as they are submitted (no queue, so no daemon needed for the webserver test), each in
# its own process (DefaultRunLauncher).
IMMEDIATE_INSTANCE = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster._core.launcher
  class: DefaultRunLauncher
code_servers:
  local_startup_timeout: 300
"""

# Runs are queued; a `dagster-daemon run` dequeues them (what `dagster job backfill` needs), two at a time
# as in the instance `make demo` writes (sd_assets.demo.DAGSTER_YAML).
QUEUED_INSTANCE = """\
telemetry:
  enabled: false
run_queue:
  max_concurrent_runs: 2
  dequeue_interval_seconds: 1
code_servers:
  local_startup_timeout: 300
"""


def make_home(path: Path, dagster_yaml: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(dagster_yaml)
    return path


def env_for(home: Path, data_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DAGSTER_HOME=str(home), SD_DATA_ROOT=str(data_root), NO_ALBUMENTATIONS_UPDATE="1",
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # One torch thread per process: the tests' models are tiny, and idle OpenMP threads spinning on a busy
    # 2-core machine cost a third of the CPU time.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def write_run_config(path: Path, data_root: Path, overrides: dict[str, Any] | None = None,
                     profile: str = "tiny", **extra: Any) -> Path:
    cfg: dict[str, Any] = {"resources": {"sd": {"config": {
        "profile": profile, "data_root": str(data_root), "overrides": overrides or {}}}}}
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def dagster(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `dagster` CLI from the repo root; fail with its output if it exits non-zero."""
    res = subprocess.run([str(BIN / "dagster"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"dagster {' '.join(args)} -> {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args`` in a new session; on exit SIGTERM then SIGKILL its whole process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    # the group may outlive its leader (code server, run workers)
                    os.killpg(proc.pid, 0)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


LOCATIONS_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


@contextlib.contextmanager
def webserver(home: Path, data_root: Path, log: Path, timeout: float = 240) -> Iterator[int]:
    """`dagster-webserver -w workspace.yaml` on a free loopback port; yields the port once `/server_info`
    answers and the code location has loaded."""
    port = free_port()
    args = [str(BIN / "dagster-webserver"), "-w", WORKSPACE, "-h", "127.0.0.1", "-p", str(port)]
    with process_group(args, env_for(home, data_root), log) as proc:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"webserver exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"webserver not ready in {timeout} s:\n{log.read_text()[-4000:]}"
            try:
                entries = graphql(port, LOCATIONS_QUERY)["data"]["workspaceOrError"]["locationEntries"]
            except OSError:
                time.sleep(1)
                continue
            entry = next((e for e in entries if e["name"] == LOCATION), None)
            if entry and entry["loadStatus"] == "LOADED":
                err = entry["locationOrLoadError"]
                assert err["__typename"] == "RepositoryLocation", f"code location failed to load: {err}"
                break
            time.sleep(1)
        yield port
