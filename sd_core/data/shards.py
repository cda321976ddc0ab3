"""Download one shard's images with img2dataset into ``shards/{shard}.tar`` (+ ``.parquet``, ``_stats.json``).

img2dataset runs as a child process in its own session (``start_new_session=True``), never in-process:
in-process it hangs without a ``__main__`` guard, fails in non-main threads and daemonic workers, and turns
SIGINT into exit 0 (notes/data-pipeline.md). We own its lifetime:

- a watchdog kills the whole process group when neither its output folder nor its log grew for
  ``watchdog_s`` seconds (img2dataset's ``timeout`` is per socket read, so one trickling server can stall a
  shard for ever), and when ``max_runtime_s`` is exceeded;
- on any exception in the parent (a Dagster cancel arrives as one) the process group is killed before the
  exception propagates, so no downloader outlives its step;
- if the parent dies without running any of that (SIGKILL, OOM), the child notices within a fraction of a
  second and kills its own group (`sd_core.data.download_guard`); its ``.tmp-*`` folder is removed by the
  next run of the same shard on this host (only folders whose pid is no longer running);
- ``NO_ALBUMENTATIONS_UPDATE=1`` is set in its environment (else each process asks a registry at import).

The child is `sd_core.data.download_guard`, which runs img2dataset with the URL policy
(`sd_core.data.url_policy`) enforced in every downloading process, at each request, redirect and socket
connect: only http(s) to public addresses plus the ``allow_hosts`` given (the loopback image server, for
the synthetic source). Refused rows fail like any broken URL, with an ``error_message`` starting ``url
policy``, and are counted in `ShardReport.refused_by_url_policy`. A shard is committed only if the process
that downloaded it marked the guard active (`download_guard.leave_guard_mark`). ``download.distributor:
pyspark`` runs the same child in a Spark session (``download.spark_master``; `download_guard.spark_session`);
a distributor that is not installed is refused before anything starts (`check_distributor`).

img2dataset numbers its outputs ``00000.tar`` … by position in its input, so it runs into a temporary folder
next to the destination and the results are moved to the shard key's names with `os.replace` (atomic; a
re-run of the same shard replaces them whole: idempotent). Failed URLs are counted, by reason, and never
fail the shard; a shard that produced no image at all raises `NoImagesError`.

Sample keys inside the tar are img2dataset's (``000000000`` …, unique within a shard only): a sample's
global identity is (shard key, sample key); the metadata's ``hash`` column is carried along in each
sample's json as well.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sd_core.atomic import fsync_dir
from sd_core.config import DownloadConfig
from sd_core.data import download_guard
from sd_core.data.url_policy import REFUSAL_PREFIX, UrlPolicy
from sd_core.paths import shard_file

# Metadata columns carried into each sample's json (only those present in the part are passed: img2dataset
# crashes on a save_additional_columns entry that is not in its input).
EXTRA_COLUMNS = ("hash", "similarity", "aesthetic", "punsafe", "pwatermark", "nsfw", "source_url")

# Inside a shard's work folder: img2dataset's output folder and its log.
_OUTPUT_FOLDER = "out"
_LOG_FILE = "img2dataset.log"


class ShardDownloadError(RuntimeError):
    """img2dataset failed, stalled or was cancelled for a shard."""


class NoImagesError(ShardDownloadError):
    """img2dataset ran, but not one image of the shard could be downloaded and decoded."""


@dataclass
class ShardReport:
    """The outcome of one shard download."""

    shard: str
    rows: int
    successes: int
    failures: dict[str, int]  # reason → count
    failed_to_download: int
    failed_to_resize: int
    bytes: int  # size of the tar
    tar: str
    parquet: str
    stats: str
    seconds: float
    output_bytes: dict[str, int] = field(default_factory=dict)
    refused_by_url_policy: int = 0  # rows (of failed_to_download) the URL policy refused to fetch

    @property
    def success_rate(self) -> float:
        return self.successes / self.rows if self.rows else 0.0

    def failures_markdown(self) -> str:
        """The failed rows by reason, as a markdown table."""
        return "\n".join(["| reason | rows |", "|---|---:|"] + [f"| {r} | {n} |" for r, n in self.failures.items()])

    def as_metadata(self) -> dict[str, Any]:
        """The download's counts and speed as plain JSON values (what an orchestrator shows for the step)."""
        return {"rows": self.rows, "successes": self.successes, "success_rate": round(self.success_rate, 4),
                "failed_to_download": self.failed_to_download, "failed_to_resize": self.failed_to_resize,
                "refused_by_url_policy": self.refused_by_url_policy, "failures_by_reason": dict(self.failures),
                "bytes": self.bytes,
                "images_per_s": round(self.successes / max(self.seconds, 1e-9), 1), "seconds": self.seconds}


def shard_paths(shards_dir: Path, shard: str) -> dict[str, Path]:
    """The shard's files; a ValueError if ``shard`` is not one plain file name or a file would land outside
    ``shards_dir`` (`sd_core.paths.shard_file`: a hostile partition key must not write elsewhere)."""
    return {
        "tar": shard_file(shards_dir, shard, ".tar"),
        "parquet": shard_file(shards_dir, shard, ".parquet"),
        "stats": shard_file(shards_dir, shard, "_stats.json"),
    }


_URLISH = re.compile(r"https?://\S+")
_POLICY_ADDRESS = re.compile(r"(?<=address )\S+(?= is )")  # url policy refusals name the address refused


def failure_reason(message: str | None) -> str:
    """Group img2dataset error messages: URLs and refused addresses dropped, long messages cut (e.g. "HTTP
    Error 404: Not Found", "<urlopen error url policy: address <addr> is loopback>")."""
    if not message:
        return "unknown"
    lines = message.strip().splitlines()
    return _POLICY_ADDRESS.sub("<addr>", _URLISH.sub("<url>", lines[0] if lines else "unknown"))[:120]


def prepare_url_file(part: Path, dest: Path,
                     rewrite: Callable[[str | None], str | None] | None) -> tuple[int, list[str]]:
    """Write img2dataset's input parquet: ``url`` (rewritten for the loopback server if asked), ``caption``
    and the extra metadata columns the part has. Returns (rows, extra column names)."""
    table = pq.read_table(part)
    if "url" not in table.column_names or "caption" not in table.column_names:
        raise ShardDownloadError(f"shard part {part} lacks url/caption columns (got {table.column_names})")
    cols: dict[str, pa.Array] = {}
    urls = table.column("url").to_pylist()
    if rewrite is not None:
        new = [rewrite(u) for u in urls]
        if new != urls:
            cols["url"] = pa.array(new, pa.string())
            cols["source_url"] = pa.array(urls, pa.string())
    cols.setdefault("url", table.column("url"))
    cols["caption"] = table.column("caption")
    for c in EXTRA_COLUMNS:
        if c in table.column_names and c not in cols:
            cols[c] = table.column(c)
    out = pa.table(cols)
    pq.write_table(out, dest)
    extras = [c for c in out.column_names if c not in ("url", "caption")]
    return out.num_rows, extras


def _folder_progress(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the non-zombie processes in process group ``pgid`` (Linux /proc; elsewhere unknown: [])."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    alive = []
    for d in proc_dir.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = 5.0, settle_s: float = 10.0) -> None:
    """SIGTERM the child's whole session, then SIGKILL what is left after ``grace_s``, and return only once
    no process of the group is still running (SIGKILL is delivered asynchronously; img2dataset's orphaned
    logger and workers would otherwise outlive the call for a moment)."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + settle_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)  # the leader's stragglers too, even when it has exited
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is not None and not live_group_members(pgid):
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def run_img2dataset(args: dict[str, Any], workdir: Path, cfg: DownloadConfig,
                    log: Callable[[str], None] | None = None, allow_hosts: Sequence[str] = ()) -> None:
    """Run img2dataset with ``args`` in a child process (own session) that enforces the URL policy with
    ``allow_hosts`` and dies with this process (`sd_core.data.download_guard`), under the watchdog."""
    args_file = workdir / "args.json"
    args_file.write_text(json.dumps(args))
    log_path = workdir / _LOG_FILE
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           download_guard.POLICY_ENV: json.dumps(list(allow_hosts)),
           download_guard.PARENT_ENV: str(os.getpid()),
           # Spark's Python workers run this interpreter (its default, `python3` on PATH, may lack the guard)
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sd_core.data.download_guard", str(args_file)],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=workdir,
        )
        if log:
            log(f"img2dataset started: pid {proc.pid}, its own session and process group")
        try:
            rc = _wait_watched(proc, Path(args["output_folder"]), log_path, cfg)
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # leader exited: reap any helper it left behind in its session
    if log:
        log(_tail(log_path, 2000))
    if rc != 0:
        raise ShardDownloadError(f"img2dataset exited with code {rc}. Log tail:\n{_tail(log_path)}")


def _wait_watched(proc: subprocess.Popen[bytes], output_folder: Path, log_path: Path, cfg: DownloadConfig) -> int:
    """Wait for ``proc`` and return its exit code; kill its group and raise `ShardDownloadError` when neither
    ``output_folder`` nor the log grew for ``cfg.watchdog_s`` or it ran past ``cfg.max_runtime_s``."""
    start = last_change = time.monotonic()
    last_progress = -1
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        progress = _folder_progress(output_folder) + log_path.stat().st_size
        if progress != last_progress:
            last_progress, last_change = progress, now
        elif now - last_change > cfg.watchdog_s:
            _kill_group(proc)
            raise ShardDownloadError(
                f"img2dataset made no progress for {cfg.watchdog_s:.0f} s (watchdog_s); killed it. "
                f"Log tail:\n{_tail(log_path)}")
        if cfg.max_runtime_s is not None and now - start > cfg.max_runtime_s:
            _kill_group(proc)
            raise ShardDownloadError(
                f"img2dataset ran longer than max_runtime_s={cfg.max_runtime_s:.0f} s; killed it. "
                f"Log tail:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def download_shard(
    part: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    shard: str,
    cfg: DownloadConfig,
    rewrite: Callable[[str | None], str | None] | None = None,
    log: Callable[[str], None] | None = None,
    allow_hosts: Sequence[str] = (),
) -> ShardReport:
    """Download the images of filtered part ``part`` into ``shards_dir/{shard}.tar`` (+ parquet, stats).

    ``rewrite`` maps each URL before img2dataset sees it (the synthetic source's placeholder host → the live
    loopback server). ``allow_hosts``: the URL policy's exceptions (`sd_core.data.url_policy.parse_allow_entry`;
    e.g. that server's ``127.0.0.1:PORT``); everything else off the public internet is refused. Partial
    failures are reported, not raised; zero images → `NoImagesError` (and no output files are replaced).
    """
    t0 = time.perf_counter()
    part = Path(part)
    out_dir = Path(shards_dir)
    shard_paths(out_dir, shard)  # refuses a shard name that would write outside out_dir, before anything is made
    out_dir.mkdir(parents=True, exist_ok=True)
    if not part.is_file():
        raise ShardDownloadError(f"shard {shard}: filtered part {part} does not exist")
    _check_allow_list(allow_hosts, shard)
    check_distributor(cfg)
    remove_stale_work_dirs(out_dir, shard, log)
    work = out_dir / _work_dir_name(shard, os.getpid())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        rows, args = _prepare_work(part, work, shard, cfg, rewrite)
        run_img2dataset(args, work, cfg, log, allow_hosts)
        produced = _produced_files(work, shard)
        _check_guarded(work, shard)
        stats = json.loads(produced["stats"].read_text())
        successes, failures = _outcomes(produced["parquet"])
        if successes == 0:
            top = ", ".join(f"{n}× {reason}" for reason, n in failures.most_common(5)) or "no rows"
            raise NoImagesError(
                f"shard {shard}: 0 of {rows} images downloaded; failures: {top}. Nothing was written to "
                f"{out_dir}; check the URLs in {part} and the network.")
        final = shard_paths(out_dir, shard)
        sizes = _commit_shard(produced, final)
        return ShardReport(
            shard=shard,
            rows=rows,
            successes=successes,
            failures=dict(failures.most_common()),
            failed_to_download=int(stats.get("failed_to_download", 0)),
            failed_to_resize=int(stats.get("failed_to_resize", 0)),
            bytes=sizes["tar"],
            tar=str(final["tar"]),
            parquet=str(final["parquet"]),
            stats=str(final["stats"]),
            seconds=round(time.perf_counter() - t0, 2),
            output_bytes=sizes,
            refused_by_url_policy=sum(n for reason, n in failures.items() if REFUSAL_PREFIX in reason),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_allow_list(allow_hosts: Sequence[str], shard: str) -> None:
    """A malformed allow-list entry is a clear error before anything starts (not a crash in the child)."""
    try:
        UrlPolicy.from_entries(allow_hosts)
    except ValueError as e:
        raise ShardDownloadError(f"shard {shard}: {e} (filter.allow_hosts)") from None


_SPARK_MASTER = re.compile(r"local(\[(\d+|\*)\])?|spark://[\w.\-\[\]:,]+|yarn|k8s://\S+")
_INSTALL_SPARK = ("install it with `make spark` (Java from Debian's default-jre-headless, pyspark from the "
                  "package index: pip install -e '.[spark]'), or set download.distributor: multiprocessing")


def check_distributor(cfg: DownloadConfig) -> None:
    """Refuse, before anything starts, a distributor that cannot run here: img2dataset given one that is not
    installed may report success having downloaded nothing (ray does), or fail deep inside Spark's launcher.
    Java is the one ``JAVA_HOME`` names, else ``java`` on PATH: where Spark's launcher looks."""
    if cfg.distributor != "pyspark":
        return
    if not _SPARK_MASTER.fullmatch(cfg.spark_master):
        raise ShardDownloadError(
            f"download.spark_master = {cfg.spark_master!r}: expected local[N], local[*], spark://HOST:PORT, "
            "yarn or k8s://URL")
    if importlib.util.find_spec("pyspark") is None:
        raise ShardDownloadError(f"download.distributor = 'pyspark' but pyspark is not installed in "
                                 f"{sys.executable}: {_INSTALL_SPARK}")
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    where = f"JAVA_HOME={java_home}" if java_home else "PATH"
    try:
        ok = java is not None and subprocess.run([java, "-version"], capture_output=True, timeout=60,
                                                 stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise ShardDownloadError(f"download.distributor = 'pyspark' needs Java, and no working java was found "
                                 f"({where}): {_INSTALL_SPARK}")


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _work_dir_name(shard: str, pid: int) -> str:
    """``.tmp-{shard}-{host}-{pid}``: the host, so that a shards folder shared between machines is only ever
    cleaned of this machine's dead runs."""
    return f".tmp-{shard}-{_HOST}-{pid}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def remove_stale_work_dirs(shards_dir: Path, shard: str, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the work folders of earlier runs of ``shard`` on this host whose process is gone (a killed
    run leaves its ``.tmp-*`` behind; a live run's, this process's included, is never touched). Returns
    the folders removed."""
    removed = []
    prefix = f".tmp-{shard}-"
    for d in sorted(shards_dir.glob(f"{prefix}*")):
        host, _, pid = d.name[len(prefix):].rpartition("-")
        if not d.is_dir() or not pid.isdigit() or host not in ("", _HOST):  # "": the older .tmp-{shard}-{pid}
            continue
        if int(pid) == os.getpid() or _pid_running(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        if log:
            log(f"removed {d.name}: left behind by run pid {pid}, which is no longer running")
    return removed


def _check_guarded(work: Path, shard: str) -> None:
    """Refuse to commit a shard unless the process that downloaded it left the URL guard's mark (fail closed:
    should img2dataset ever stop pickling its Downloader into its workers, or a distributor run them some
    other way, nothing unguarded is kept). The mark is a file in img2dataset's output folder, not a line of
    our log, so that it also comes back from a Spark cluster's executors."""
    marks = sorted((work / _OUTPUT_FOLDER / download_guard.GUARD_MARK_DIR).glob("00000-*"))
    if not any(download_guard.WORKER_MARK in m.read_text(errors="replace") for m in marks):
        raise ShardDownloadError(
            f"shard {shard}: img2dataset's worker did not report the URL policy guard active; the shard was "
            f"not written. Log tail:\n{_tail(work / _LOG_FILE)}")


def _prepare_work(part: Path, work: Path, shard: str, cfg: DownloadConfig,
                  rewrite: Callable[[str | None], str | None] | None) -> tuple[int, dict[str, Any]]:
    """Write img2dataset's input file into ``work``; return its row count and img2dataset's arguments."""
    url_file = work / "urls.parquet"
    rows, extras = prepare_url_file(part, url_file, rewrite)
    if rows == 0:
        raise NoImagesError(f"shard {shard}: filtered part {part} has no rows")
    args = {
        "url_list": str(url_file),
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": extras,
        "output_format": "webdataset",
        "output_folder": str(work / _OUTPUT_FOLDER),
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "encode_quality": cfg.encode_quality,
        "processes_count": cfg.processes_count,
        "thread_count": cfg.thread_count,
        "timeout": cfg.timeout_s,
        "retries": cfg.retries,
        "number_sample_per_shard": max(rows, 1),  # the whole part in one img2dataset shard, 00000
        "distributor": cfg.distributor,
        "enable_wandb": False,
        "incremental_mode": "incremental",  # a fresh folder each run ("overwrite" deletes its own _tmp: 1.47 bug)
        "compute_hash": None,
    }
    if cfg.distributor == "pyspark":
        args[download_guard.SPARK_MASTER_ARG] = cfg.spark_master  # taken out by download_guard, not img2dataset's
    return rows, args


def _produced_files(work: Path, shard: str) -> dict[str, Path]:
    """img2dataset's tar, parquet and stats in ``work``; `ShardDownloadError` if it exited without one."""
    out = work / _OUTPUT_FOLDER
    produced = {"tar": out / "00000.tar", "parquet": out / "00000.parquet", "stats": out / "00000_stats.json"}
    missing = [str(p) for p in produced.values() if not p.is_file()]
    if missing:
        raise ShardDownloadError(f"shard {shard}: img2dataset finished without writing {missing}. "
                                 f"Log tail:\n{_tail(work / _LOG_FILE)}")
    return produced


def _outcomes(result_parquet: Path) -> tuple[int, Counter[str]]:
    """From img2dataset's per-row results: the successes, and the failures counted by `failure_reason`."""
    result = pq.read_table(result_parquet, columns=["status", "error_message"]).to_pylist()
    failures = Counter(failure_reason(r["error_message"]) for r in result if r["status"] != "success")
    successes = sum(1 for r in result if r["status"] == "success")
    return successes, failures


def _commit_shard(produced: dict[str, Path], final: dict[str, Path]) -> dict[str, int]:
    """Rename img2dataset's outputs to the shard key's names (atomic, and a re-run replaces them whole);
    return their sizes."""
    sizes = {}
    for kind in ("tar", "parquet", "stats"):  # stats last: its presence marks a complete shard
        sizes[kind] = produced[kind].stat().st_size
        os.replace(produced[kind], final[kind])
    fsync_dir(final["stats"].parent)
    return sizes
