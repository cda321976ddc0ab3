"""img2dataset as a supervised subprocess: watchdog, cancellation, zero images. Real img2dataset, real HTTP."""

import re
import signal
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
def trickle_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.jpg"
    httpd.shutdown()
    httpd.server_close()


def _part(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))],
                             "hash": pa.array(range(len(urls)), pa.int64())}), path)
    return path


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
                       log=logs.append)
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
                           log=logs.append)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert live_group_members(_pid_from(logs)) == []
    assert list((tmp_path / "shards").iterdir()) == []


def test_zero_images_is_a_clear_failure_that_writes_nothing(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00001.tar").write_bytes(b"an earlier good download")
    urls = [f"{SYNTHETIC_BASE_URL}/missing/circle/red/white/64x64/{i}.png" for i in range(3)]
    urls.append(f"{SYNTHETIC_BASE_URL}/corrupt/circle/red/white/64x64/9.png")
    with ImageServer() as srv:
        with pytest.raises(NoImagesError, match=r"shard 00001: 0 of 4 images downloaded; failures: "
                                                r"3× HTTP Error 404: Not Found, 1× Image decoding error"):
            download_shard(_part(tmp_path / "p.parquet", urls), shards, "00001", CFG, rewrite=srv.rewrite)
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
