"""Launching and supervising the torchrun trainer from another process (the `unet_checkpoint` asset).

Why here and not in the asset: the command line, the per-rank error files and the clean-up of leftover
trainer processes are plain process management, testable without Dagster. The trainer records each rank's
PID (``{run}/pids/rank{R}.json``) and traceback (``{run}/errors/rank{R}.txt``); this module reads them.

Single-node runs go through ``python -m sd_core.training.launch`` (`loopback_torchrun`), torchrun with its
rendezvous bound to 127.0.0.1. Why not ``torchrun --standalone``: its agent's TCPStore listens on every
interface (``*:PORT``, measured with ``ss -ltnp`` on torch 2.13), so anyone who can reach the machine could
join or poison the run's store. ``--rdzv-backend=static --master-addr 127.0.0.1`` alone does not help either:
TCPStore binds the wildcard address whatever host it is given; only a socket handed to it
(``master_listen_fd``) decides where it listens. Multi-node runs use torchrun itself (DESIGN.md section 7).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

LOOPBACK = "127.0.0.1"


def trainer_command(profile_name: str, data_root: Path, overrides: dict[str, Any], out: Path, run_id: str,
                    resume: str, nproc: int, extra_args: list[str]) -> list[str]:
    """The torchrun command line of a training run on this machine (the venv's interpreter, so its torch is used;
    the rendezvous on loopback, see `loopback_torchrun`)."""
    return [
        sys.executable, "-m", "sd_core.training.launch", f"--nproc_per_node={nproc}",
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


# ----------------------------------------------------------------------------------- loopback torchrun
def _loopback_listener() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 and a free port (kept open: no other process can take the port
    between choosing it and the store using it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    return sock


def _serve_store_on(sock: socket.socket) -> None:
    """Make the static rendezvous' TCPStore server listen on ``sock`` instead of binding every interface.
    Only the store created for ``sock``'s port in this (agent) process is affected; workers are separate
    processes that connect to it as clients."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    port = sock.getsockname()[1]

    class LoopbackTCPStore(dist.TCPStore):  # type: ignore[misc]
        def __init__(self, host_name: str, port_: int, world_size: int | None = None, is_master: bool = False,
                     *args: Any, **kwargs: Any) -> None:
            if is_master and port_ == port and "master_listen_fd" not in kwargs:
                kwargs["master_listen_fd"] = sock.detach()  # the store owns the descriptor from here on
            super().__init__(host_name, port_, world_size, is_master, *args, **kwargs)

    static_tcp_rendezvous.TCPStore = LoopbackTCPStore


def loopback_argv(port: int, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments for one node whose rendezvous is 127.0.0.1:``port`` (``argv``: the rest, e.g.
    ``--nproc_per_node=2 -m sd_core.train ...``)."""
    return ["--nnodes=1", "--node-rank=0", "--rdzv-backend=static", f"--master-addr={LOOPBACK}",
            f"--master-port={port}", *argv]


def loopback_torchrun(argv: Sequence[str]) -> None:
    """torchrun on one node with nothing listening beyond loopback: the agent's store on a socket bound to
    127.0.0.1, gloo's and NCCL's sockets on ``lo`` (unless the caller chose an interface)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    sock = _loopback_listener()
    _serve_store_on(sock)
    from torch.distributed.run import main as torchrun_main

    torchrun_main(loopback_argv(sock.getsockname()[1], argv))


if __name__ == "__main__":
    loopback_torchrun(sys.argv[1:])
