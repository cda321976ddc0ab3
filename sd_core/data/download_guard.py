"""img2dataset's child process, guarded: ``python -m sd_core.data.download_guard ARGS.json``.

`sd_core.data.shards` starts this module (never ``img2dataset`` directly) with the URL policy's allow-list
in `POLICY_ENV` and its own pid in `PARENT_ENV`. Before img2dataset downloads anything:

- **The URL policy, in every process that fetches.** img2dataset's multiprocessing distributor *spawns* its
  workers (``get_context("spawn")``: fresh interpreters, so nothing patched here would reach them), and they
  fetch with ``urllib.request.urlopen``. So img2dataset's ``Downloader`` is replaced by
  `sd_core.data.guarded_downloader.GuardedDownloader`, which img2dataset pickles into each worker by
  reference: its first call there installs the guard from the (inherited) environment
  (`install_in_worker`), prints `WORKER_MARK`, and leaves a mark file for the shard it is about to download
  (`leave_guard_mark`): the parent commits a shard only with its mark. The guard is
  an urllib opener whose ``default_open`` runs before any scheme handler, for every request and every
  redirect, refusing what `UrlPolicy.url_refusal` refuses (``file:``, ``data:``, ``ftp:``, literal private
  addresses, ``localhost``; there is no proxy handler, so environment proxies are not used), and a check in
  ``socket.socket.connect`` of the address actually connected to after DNS (`UrlPolicy.address_refusal`).
  Refusals surface as img2dataset's per-row ``error_message``, starting with ``url policy``.
- **On Spark** (``distributor: pyspark``), the downloads run in Spark's Python workers (forked by its
  ``pyspark.daemon``): `GuardedDownloader` is pickled into them the same way and installs the same guard
  from ``spark.executorEnv`` there, and leaves the same mark (a shared output folder: on a cluster, where the
  executors' output is in their own logs). This process only drives its Spark session (`_download_on_spark`).
- **Without torch.** img2dataset imports webdataset, which imports torch only for its optional PyTorch
  classes and puts empty stand-ins in their place when torch is missing (``webdataset/pytorch.py``); nothing
  here uses them. `keep_torch_out` makes ``import torch`` fail at once in this process and, run again as
  ``__mp_main__`` by the spawn start method, in every worker before it unpickles its task: importing
  img2dataset then takes 1.5 s instead of 4.3 s on a 2-core Zen 5, paid twice per shard (BENCHMARKS.md,
  session 17).
- **It dies with its parent.** A thread polls ``os.getppid()``; when the launching process is gone (even
  SIGKILLed, which runs none of its cleanup) it SIGKILLs this whole process group, workers and img2dataset's
  logger process included (they share the group: the parent starts this one in a new session).
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from sd_core.data.url_policy import REFUSAL_PREFIX, UrlPolicy

POLICY_ENV = "SD_URL_POLICY_ALLOW"  # JSON list of allow-list entries (`sd_core.data.url_policy`)
PARENT_ENV = "SD_DOWNLOAD_PARENT_PID"
WORKER_MARK = "url policy guard active in downloader process"
GUARD_MARK_DIR = "_url_guard"  # in img2dataset's output folder: one mark per shard downloaded (leave_guard_mark)
SPARK_MASTER_ARG = "spark_master"  # in ARGS.json with distributor pyspark; not an img2dataset argument
PARENT_POLL_S = 0.2
EXIT_PARENT_GONE = 70
EXIT_NO_SPARK = 71

_installed: UrlPolicy | None = None  # this process's guard, once installed


def keep_torch_out() -> None:
    """Make ``import torch`` raise ModuleNotFoundError in this process (see the module doc: webdataset stands in
    for torch's classes then). For the downloader's processes only: the parent imports this module for its
    constants and needs torch."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type] # None in sys.modules: the import fails


if __name__ in ("__main__", "__mp_main__"):  # this process, and img2dataset's spawned workers (module doc)
    keep_torch_out()


class UrlPolicyRefusal(OSError):
    """A connection the URL policy refused (an OSError, so urllib reports it like any failed connect)."""


class _PolicyHandler(urllib.request.BaseHandler):
    """Refuses a request before any scheme handler sees it (``default_open`` runs first, redirects too)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def default_open(self, req: urllib.request.Request) -> None:
        refusal = self.policy.url_refusal(req.full_url)
        if refusal is None:
            return None  # go on to the http/https handler
        if getattr(req, "redirect_dict", None):  # set by HTTPRedirectHandler on the request it follows
            refusal = refusal.replace(REFUSAL_PREFIX, f"{REFUSAL_PREFIX}: redirect refused", 1)
        raise urllib.error.URLError(refusal)


class _PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Refuses a redirect to a URL the policy refuses, with the policy's reason (urllib's own scheme check
    would refuse ``file:`` with a message that does not say why, and let ``ftp:`` through)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = headers.get("location") or headers.get("uri")
        refusal = self.policy.url_refusal(urljoin(req.full_url, target)) if target else None
        if refusal is not None:
            fp.close()
            raise urllib.error.URLError(refusal.replace(REFUSAL_PREFIX, f"{REFUSAL_PREFIX}: redirect refused", 1))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _checked_address(policy: UrlPolicy, family: int, address: Any) -> Any:
    """The address to connect to, or `UrlPolicyRefusal`. A host name is resolved here and the checked
    numeric address returned, so no second lookup can answer differently (DNS rebinding)."""
    host, port = address[0], address[1]
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        address = infos[0][4]
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    refusal = policy.address_refusal(ip, port)
    if refusal is not None:
        raise UrlPolicyRefusal(refusal)
    return address


def _guard_sockets(policy: UrlPolicy) -> None:
    """Check every IPv4/IPv6 ``connect``/``connect_ex`` of this process (ssl sockets go through these too)."""
    plain_connect, plain_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            address = _checked_address(policy, self.family, address)
        return plain_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            address = _checked_address(policy, self.family, address)
        return plain_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


def install_guard(policy: UrlPolicy) -> UrlPolicy:
    """Install the URL policy in this process (idempotent: the first policy stays); returns the one in force."""
    global _installed
    if _installed is None:
        resolved = policy.with_resolved_names()
        _guard_sockets(resolved)
        # No ProxyHandler entries: a proxy would do the connecting, out of the socket check's sight.
        urllib.request.install_opener(urllib.request.build_opener(
            urllib.request.ProxyHandler({}), _PolicyHandler(resolved), _PolicyRedirectHandler(resolved)))
        _installed = resolved
    return _installed


def allow_entries_from_env() -> list[str]:
    """The allow-list in `POLICY_ENV`; refuses to run without one (fail closed)."""
    raw = os.environ.get(POLICY_ENV)
    if raw is None:
        raise RuntimeError(f"{POLICY_ENV} is not set: refusing to download without the URL policy "
                           "(start downloads through sd_core.data.shards)")
    return list(json.loads(raw))


def install_from_env() -> UrlPolicy:
    """`install_guard` with the allow-list from `POLICY_ENV` (fail closed without one)."""
    return install_guard(UrlPolicy.from_entries(allow_entries_from_env()))


def install_in_worker() -> None:
    """`install_from_env`, announcing `WORKER_MARK` on this process's first call (for the parent's check)."""
    first = _installed is None
    install_from_env()
    if first:
        print(f"{WORKER_MARK} (pid {os.getpid()})", flush=True)


def leave_guard_mark(output_folder: str, shard_id: int) -> None:
    """Write ``{output_folder}/_url_guard/{shard_id:05d}-{host}-{pid}``: this process's guard is installed and
    it is about to download that shard. The parent commits a shard only with its mark (`GUARD_MARK_DIR`):
    a file next to the shard, because on a Spark cluster the workers' output is in the executors' logs, not
    ours. Written with fsspec, like img2dataset's own output. Raises, never guesses, when there is no guard."""
    if _installed is None:
        raise RuntimeError("leave_guard_mark before the URL policy guard was installed")
    import fsspec  # img2dataset's dependency: imported in its workers only

    host, pid = socket.gethostname(), os.getpid()
    fs, root = fsspec.core.url_to_fs(output_folder)
    fs.makedirs(f"{root}/{GUARD_MARK_DIR}", exist_ok=True)
    with fs.open(f"{root}/{GUARD_MARK_DIR}/{shard_id:05d}-{host}-{pid}", "w") as f:
        f.write(f"{WORKER_MARK} (pid {pid}, host {host})\n")


def watch_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """Start a daemon thread that SIGKILLs this process group as soon as ``parent_pid`` is no longer our
    parent (it died: we were re-parented). Only a group this process leads (its own session, as
    `sd_core.data.shards` starts it): never the group of whoever else started it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="sd-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    """Run ``img2dataset.download(**json(argv[1]))`` guarded (see module doc)."""
    # An ignored SIGTERM is inherited through fork and exec, and a Dagster step started with SIGINT ignored (a
    # background job: CI, nohup) ignores SIGTERM too (dagster maps it to SIGINT's handler). img2dataset's
    # Pool.terminate() SIGTERMs a worker that missed its sentinel and joins it: ignored, that join never returns.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if parent and os.getppid() != parent:
        return EXIT_PARENT_GONE  # the launcher died before we got here
    if parent:
        watch_parent(parent)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    entries = allow_entries_from_env()
    args = json.loads(Path(argv[1]).read_text())
    spark_master = args.pop(SPARK_MASTER_ARG, None)
    if args.get("distributor") == "pyspark":
        return _download_on_spark(args, spark_master or "local[2]", entries)
    install_guard(UrlPolicy.from_entries(entries))
    _guarded_img2dataset().download(**args)
    return 0


def _guarded_img2dataset() -> Any:
    """img2dataset's main module, building its Downloader as `GuardedDownloader`."""
    # Imported here, not at the top: the parent imports this module for its constants. By importlib: the
    # package's __init__ shadows its submodule ``main`` with the function of that name.
    i2d_main = importlib.import_module("img2dataset.main")
    from sd_core.data.guarded_downloader import GuardedDownloader

    i2d_main.Downloader = GuardedDownloader  # type: ignore[misc] # download() builds its Downloader by this name
    return i2d_main


def _download_on_spark(args: dict[str, Any], master: str, entries: list[str]) -> int:
    """img2dataset's pyspark distributor in a Spark session of ours (img2dataset takes the active one).

    The download happens in Spark's Python workers, each guarded by `GuardedDownloader` with the plain
    policy. This driver fetches nothing; it talks to its own JVM: started before the guard is installed
    here, and then the guard's one exception is that JVM's py4j gateway (its other channels to Python are
    Unix domain sockets, ``spark.python.unix.domain.socket.enabled``: not network addresses)."""
    try:
        spark = spark_session(master)
    except Exception as e:  # pyspark's launcher: no Java, a bad master URL, an unreachable cluster
        print(f"download.distributor = 'pyspark': could not start a Spark session on {master}: {e}",
              file=sys.stderr, flush=True)
        return EXIT_NO_SPARK
    try:
        gateway = spark.sparkContext._gateway.gateway_parameters
        install_guard(UrlPolicy.from_entries([*entries, f"{gateway.address}:{gateway.port}"]))
        _guarded_img2dataset().download(**args)
    finally:
        spark.stop()
    return 0


def spark_session(master: str) -> Any:
    """The Spark session for one shard. Its executors get the URL policy's allow-list in their environment
    (``spark.executorEnv``: on a cluster they do not inherit ours), so `GuardedDownloader` installs the same
    guard in each Spark Python worker. A local session listens on loopback only, without a web UI."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(master).appName("sd-pipeline image_shards")
               .config("spark.ui.enabled", "false")
               .config("spark.python.unix.domain.socket.enabled", "true")
               .config(f"spark.executorEnv.{POLICY_ENV}", os.environ[POLICY_ENV])
               .config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1"))
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # the JVM reads it before any config
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


if __name__ == "__main__":
    from sd_core.data.download_guard import main as _named_main  # one module copy, not __main__ and another

    sys.exit(_named_main(sys.argv))
