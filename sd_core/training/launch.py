"""Launching and supervising the torchrun trainer from another process (the `unet_checkpoint` asset).

Why here and not in the asset: the command line, the per-rank error files and the clean-up of leftover
trainer processes are plain process management, testable without Dagster. The trainer records each rank's
PID (``{run}/pids/rank{R}.json``) and traceback (``{run}/errors/rank{R}.txt``); this module reads them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def trainer_command(profile_name: str, data_root: Path, overrides: dict[str, Any], out: Path, run_id: str,
                    resume: str, nproc: int, extra_args: list[str]) -> list[str]:
    """The torchrun command line of a training run (the venv's interpreter, so its torch is used)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "sd_core.train",
        "--profile", profile_name, "--data-root", str(data_root), "--overrides", json.dumps(overrides or {}),
        "--output-dir", str(out), "--run-id", run_id, "--resume", resume, *extra_args,
    ]


def rank_errors(out: Path, limit: int = 4000) -> str:
    """What the failed ranks wrote: one summary line per rank (its exception), then each traceback's tail."""
    files = sorted((out / "errors").glob("rank*.txt"))
    texts = {f.stem: f.read_text(errors="replace").strip() for f in files}
    summary = [f"{rank}: {text.splitlines()[-1] if text else '?'}" for rank, text in texts.items()]
    details = [f"--- {rank} ---\n{text[-limit:]}" for rank, text in texts.items()]
    return "\n".join(summary + details)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def trainer_processes(out: Path) -> list[int]:
    """PIDs of live processes of this run's trainer (ranks and their torchrun agent), from ``{out}/pids``,
    confirmed by their command line naming ``sd_core.train`` and this run directory."""
    pids: set[int] = set()
    for f in (out / "pids").glob("rank*.json"):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        pids.update(int(rec[k]) for k in ("pid", "ppid") if k in rec)
    alive = []
    for pid in sorted(pids):
        cmd = _cmdline(pid)
        if "sd_core.train" in cmd and str(out) in cmd and pid != os.getpid():
            alive.append(pid)
    return alive


def stop_trainer_processes(out: Path, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every trainer process of this run still alive."""
    pids = trainer_processes(out)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and trainer_processes(out):
        time.sleep(0.2)
    for pid in trainer_processes(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
