"""Launching and supervising the torchrun trainer from another process (the `unet_checkpoint` asset).

Why here and not in the asset: the command line, the per-rank error files and the clean-up of leftover
trainer processes are plain process management, testable without Dagster. The trainer records each rank's
PID (``{run}/pids/rank{R}.json``) and traceback (``{run}/errors/rank{R}.txt``); this module reads them.

Single-node runs go through ``python -m sd_core.training.launch`` (`loopback_torchrun`), torchrun with its
rendezvous bound to 127.0.0.1. Why not ``torchrun --standalone``: its agent's TCPStore listens on every
interface (``*:PORT``, measured with ``ss -ltnp`` on torch 2.13), so anyone who can reach the machine could
join or poison the run's store. ``--rdzv-backend=static --master-addr 127.0.0.1`` alone does not help either:
TCPStore binds the wildcard address whatever host it is given; only a socket handed to it
(``master_listen_fd``) decides where it listens.

Multi-node runs (`trainer_command` with ``nnodes > 1``; DESIGN.md section 7) are torchrun itself, run with the
same arguments on every node except ``--node-rank``, and a *static* rendezvous at node rank 0's
``HOST:PORT`` (``--rdzv-backend=static --rdzv-endpoint=HOST:PORT``): node R then holds global ranks
``R*G .. R*G+G-1``, so node rank 0 holds global rank 0, the only rank that writes checkpoints and reports to
Dagster. Why not ``c10d``: its rendezvous ignores ``--node-rank`` (torchrun warns so) and numbers the nodes
by host name, then agent PID (torch 2.13, ``dynamic_rendezvous``): global rank 0 can land on any node. Node
rank 0's agent hosts the rendezvous store, listening on every interface (the other nodes must reach it).
Every rank writes into global rank 0's ``--output-dir`` (the trainer broadcasts it): on a cluster that path
must be shared storage, the same on every node, or the other nodes cannot resume.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

LOOPBACK = "127.0.0.1"


def trainer_command(profile_name: str, data_root: Path, overrides: dict[str, Any], out: Path, run_id: str,
                    resume: str, nproc: int, extra_args: list[str], nnodes: int = 1, node_rank: int = 0,
                    rdzv_endpoint: str = "") -> list[str]:
    """This node's torchrun command line of a training run (the venv's interpreter, so its torch is used). One
    node: the rendezvous on loopback (`loopback_torchrun`); several: node ``node_rank``'s share of a static
    rendezvous at ``rdzv_endpoint`` (module docs), refused by `check_nodes` when inconsistent."""
    check_nodes(nnodes, node_rank, rdzv_endpoint)
    if nnodes == 1:
        launcher = [sys.executable, "-m", "sd_core.training.launch", f"--nproc_per_node={nproc}"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
                    f"--nproc-per-node={nproc}", "--rdzv-backend=static", f"--rdzv-endpoint={rdzv_endpoint}"]
    return [
        *launcher, "-m", "sd_core.train",
        "--profile", profile_name, "--data-root", str(data_root), "--overrides", json.dumps(overrides or {}),
        "--output-dir", str(out), "--run-id", run_id, "--resume", resume, *extra_args,
    ]


# HOST:PORT with HOST a name, an IPv4 address or a bracketed IPv6 address (torchrun's own endpoint syntax)
_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)"
                       r":(?P<port>[0-9]{1,5})$")


def check_nodes(nnodes: int, node_rank: int, rdzv_endpoint: str) -> None:
    """Refuse an inconsistent multi-node setting, naming the field (``ValueError``): ``rdzv_endpoint`` is
    required with ``nnodes > 1`` and refused with one node (it would silently train alone on loopback)."""
    if isinstance(nnodes, bool) or not isinstance(nnodes, int) or nnodes < 1:
        raise ValueError(f"nnodes must be a whole number >= 1, got {nnodes!r}")
    if isinstance(node_rank, bool) or not isinstance(node_rank, int) or not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be in 0..{nnodes - 1} (nnodes={nnodes}), got {node_rank!r}")
    if nnodes == 1:
        if rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint ({rdzv_endpoint!r}) is only used with nnodes > 1; a one-node run "
                             f"keeps its rendezvous on loopback: set nnodes or leave rdzv_endpoint empty")
        return
    if not rdzv_endpoint:
        raise ValueError(f"rdzv_endpoint is required when nnodes > 1 (nnodes={nnodes}): node rank 0's HOST:PORT, "
                         f"the same on every node, e.g. 10.0.0.1:29400")
    m = _ENDPOINT.match(rdzv_endpoint)
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(f"rdzv_endpoint {rdzv_endpoint!r} is not HOST:PORT with a port in 1..65535 (node rank "
                         f"0's host name or address, e.g. 10.0.0.1:29400 or [fd00::1]:29400)")


def node_global_ranks(node_rank: int, nproc: int) -> range:
    """The global ranks node ``node_rank`` holds in a static rendezvous with ``nproc`` processes per node."""
    return range(node_rank * nproc, (node_rank + 1) * nproc)


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


def _rank_of(pid_file: Path) -> int | None:
    try:
        return int(pid_file.stem.removeprefix("rank"))
    except ValueError:
        return None


def trainer_processes(out: Path, ranks: Iterable[int] | None = None) -> list[int]:
    """PIDs of live processes of this run's trainer (ranks and their torchrun agent), from ``{out}/pids``,
    confirmed by their command line naming ``sd_core.train`` and this run directory. ``ranks``: only those
    global ranks (a node's own: the other nodes' PIDs in a shared run directory belong to other machines)."""
    wanted = None if ranks is None else set(ranks)
    pids: set[int] = set()
    for f in (out / "pids").glob("rank*.json"):
        if wanted is not None and _rank_of(f) not in wanted:
            continue
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


def stop_trainer_processes(out: Path, grace_s: float = 10.0, ranks: Iterable[int] | None = None) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every trainer process of this run (of ``ranks`` only, if given)
    still alive."""
    pids = trainer_processes(out, ranks)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and trainer_processes(out, ranks):
        time.sleep(0.2)
    for pid in trainer_processes(out, ranks):
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
