"""img2dataset as a supervised subprocess: watchdog, cancellation, its parent's death, zero images. Real
img2dataset, real HTTP."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_core.config import DownloadConfig
from sd_core.data.image_server import ImageServer
from sd_core.data.shards import (
    NoImagesError,
    ShardDownloadError,
    live_group_members,
    download_shard,
    failure_reason,
)
from sd_core.data.synthetic import SYNTHETIC_BASE_URL

CFG = DownloadConfig(image_size=32, thread_count=2, timeout_s=30, watchdog_s=600)


class _Trickle(BaseHTTPRequestHandler):
    """Announces a big image, then sends one byte every 0.5 s: img2dataset's per-read timeout never fires."""

    def do_GET(self):  # noqa: N802
        self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(240):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def trickle():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    httpd.hits = 0
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def trickle_url(trickle):
    return f"http://127.0.0.1:{trickle.server_address[1]}/slow.jpg"  # loopback: allow it (_allow) to download


def _part(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))],
                             "hash": pa.array(range(len(urls)), pa.int64())}), path)
    return path


def _allow(url: str) -> list[str]:
    """The URL policy's allow-list entry for the loopback test server of ``url`` (host:port)."""
    return [url.split("/")[2]]


def _pid_from(logs: list[str]) -> int:
    for line in logs:
        m = re.search(r"img2dataset started: pid (\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no pid in {logs}")


def test_watchdog_kills_a_stalled_download_and_its_whole_group(tmp_path, trickle_url):
    logs: list[str] = []
    cfg = DownloadConfig(image_size=32, thread_count=2, timeout_s=30, watchdog_s=4)
    t0 = time.monotonic()
    with pytest.raises(ShardDownloadError, match=r"no progress for 4 s \(watchdog_s\)"):
        download_shard(_part(tmp_path / "p.parquet", [trickle_url] * 2), tmp_path / "shards", "00000", cfg,
                       log=logs.append, allow_hosts=_allow(trickle_url))
    assert time.monotonic() - t0 < 90
    pid = _pid_from(logs)
    assert live_group_members(pid) == []
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == []  # temp folder removed, nothing written


def test_cancel_in_the_parent_kills_the_process_group(tmp_path, trickle_url):
    """A Dagster cancel arrives as an exception raised in the step's main thread; simulate it with SIGALRM."""
    logs: list[str] = []

    class Cancelled(Exception):
        pass

    def on_alarm(signum, frame):
        raise Cancelled()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 6.0)
    try:
        with pytest.raises(Cancelled):
            download_shard(_part(tmp_path / "p.parquet", [trickle_url] * 2), tmp_path / "shards", "00000", CFG,
                           log=logs.append, allow_hosts=_allow(trickle_url))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert live_group_members(_pid_from(logs)) == []
    assert list((tmp_path / "shards").iterdir()) == []


# Runs download_shard in a process of its own, which the test then SIGKILLs (no cleanup of ours can run).
_LAUNCHER = """
import sys
from sd_core.config import DownloadConfig
from sd_core.data.shards import download_shard
part, shards, allow = sys.argv[1:4]
download_shard(part, shards, "00000", DownloadConfig(image_size=32, thread_count=2, timeout_s=30, watchdog_s=600),
               log=lambda m: print(m, flush=True), allow_hosts=[allow])
"""


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_the_downloader_dies_with_its_killed_parent_and_the_next_run_removes_its_folder(tmp_path, trickle,
                                                                                          trickle_url):
    shards = tmp_path / "shards"
    launcher_log = tmp_path / "launcher.log"
    with open(launcher_log, "w") as out:
        launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(_part(tmp_path / "p.parquet", [trickle_url])),
                                     str(shards), _allow(trickle_url)[0]], stdout=out, stderr=subprocess.STDOUT)
    pgid = None
    try:
        pgid = _wait_for(lambda: re.search(r"img2dataset started: pid (\d+)", launcher_log.read_text()), 60,
                         "the download to start").group(1)
        pgid = int(pgid)
        _wait_for(lambda: trickle.hits, 120, "an img2dataset worker to be mid-download")
        assert len(live_group_members(pgid)) >= 2  # img2dataset and its spawned worker(s)
        launcher.send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=10) == -signal.SIGKILL
        _wait_for(lambda: not live_group_members(pgid), 5, f"img2dataset's processes {live_group_members(pgid)} to die")
    finally:
        launcher.kill()
        if pgid is not None and live_group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
    (stale,) = shards.glob(".tmp-00000-*")  # the killed run's work folder, left behind
    assert stale.name.endswith(f"-{launcher.pid}")
    live = shards / (stale.name.rsplit("-", 1)[0] + f"-{os.getppid()}")  # a live process's: never touched
    live.mkdir()

    # The next run of the partition removes the dead run's folder and downloads as usual.
    logs: list[str] = []
    with ImageServer() as srv:
        good = _part(tmp_path / "good.parquet", [f"{srv.base_url}/shapes/circle/red/white/64x64/1.png"])
        report = download_shard(good, shards, "00000", CFG, log=logs.append, allow_hosts=[srv.authority])
    assert report.successes == 1
    assert sorted(p.name for p in shards.iterdir()) == sorted(["00000.tar", "00000.parquet", "00000_stats.json",
                                                                live.name])
    assert any(f"removed {stale.name}" in line for line in logs), logs


def test_zero_images_is_a_clear_failure_that_writes_nothing(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00001.tar").write_bytes(b"an earlier good download")
    urls = [f"{SYNTHETIC_BASE_URL}/missing/circle/red/white/64x64/{i}.png" for i in range(3)]
    urls.append(f"{SYNTHETIC_BASE_URL}/corrupt/circle/red/white/64x64/9.png")
    with ImageServer() as srv:
        with pytest.raises(NoImagesError, match=r"shard 00001: 0 of 4 images downloaded; failures: "
                                                r"3× HTTP Error 404: Not Found, 1× Image decoding error"):
            download_shard(_part(tmp_path / "p.parquet", urls), shards, "00001", CFG, rewrite=srv.rewrite,
                           allow_hosts=[srv.authority])
    assert sorted(p.name for p in shards.iterdir()) == ["00001.tar"]
    assert (shards / "00001.tar").read_bytes() == b"an earlier good download"


def test_missing_or_empty_part(tmp_path):
    with pytest.raises(ShardDownloadError, match="does not exist"):
        download_shard(tmp_path / "nope.parquet", tmp_path / "s", "00000", CFG)
    with pytest.raises(NoImagesError, match="has no rows"):
        download_shard(_part(tmp_path / "e.parquet", []), tmp_path / "s", "00000", CFG)


def test_failure_reasons_group_messages():
    assert failure_reason("HTTP Error 404: Not Found") == "HTTP Error 404: Not Found"
    assert failure_reason("<urlopen error [Errno 111] Connection refused> http://127.0.0.1:4321/x") == \
        "<urlopen error [Errno 111] Connection refused> <url>"
    assert failure_reason(None) == "unknown"
    assert failure_reason("<urlopen error url policy: address [::1]:8080 is loopback>") == \
        "<urlopen error url policy: address <addr> is loopback>"


def _sigterm_ignored(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (its ``SigIgn`` mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError(f"no SigIgn line for pid {pid}")


def test_img2dataset_never_inherits_an_ignored_sigterm(tmp_path, trickle, trickle_url):
    """Dagster maps SIGTERM to whatever SIGINT's handler is (``dagster._utils.interrupts``), so in a run started
    with SIGINT ignored (a background job of a non-interactive shell: CI, nohup) SIGTERM ends up ignored too, and
    an ignored signal is inherited by every subprocess. img2dataset's ``Pool.terminate()`` stops a worker that
    missed its sentinel with SIGTERM and then joins it: with the signal ignored it waited forever (a CI run hung
    there, the shard's images all downloaded). Every process of the download must take SIGTERM again."""
    members: dict[int, bool] = {}

    def inspect_group(pgid: int) -> None:
        _wait_for(lambda: trickle.hits, 120, "an img2dataset worker to be mid-download")
        for pid in live_group_members(pgid):
            # multiprocessing's resource tracker ignores SIGTERM on purpose (it exits when its pipe closes)
            if b"multiprocessing.resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                members[pid] = _sigterm_ignored(pid)
        os.killpg(pgid, signal.SIGTERM)  # what Pool.terminate() sends: inspected, the download may end now

    def on_log(line: str) -> None:
        m = re.search(r"img2dataset started: pid (\d+)", line)
        if m:
            threading.Thread(target=inspect_group, args=(int(m.group(1)),), daemon=True).start()

    # The trickle never finishes: the inspection ends the download with SIGTERM (a fixed 8 s watchdog once
    # ended it before img2dataset's first request on a loaded CI machine); the watchdog is only the backstop.
    cfg = dataclasses.replace(CFG, watchdog_s=60)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what such a Dagster step hands its children
    try:
        with pytest.raises(ShardDownloadError, match="exited with code -15"):
            download_shard(_part(tmp_path / "p.parquet", [trickle_url]), tmp_path / "shards", "00000", cfg,
                           log=on_log, allow_hosts=_allow(trickle_url))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(members) >= 2, members  # img2dataset and its spawned worker and logger processes
    assert not any(members.values()), f"processes ignoring SIGTERM: {[p for p, ign in members.items() if ign]}"
