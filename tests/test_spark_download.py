"""img2dataset on Spark (``download.distributor: pyspark``): the same shard as its multiprocessing distributor,
the URL policy enforced in Spark's Python workers, and a loud refusal where Spark cannot run. Real
img2dataset, real Spark (a ``local[2]`` session: Java and pyspark from `make spark`), real loopback HTTP.

The Spark runs are `slow` (a JVM start and a Spark job per shard: about a minute each on 2 cores), on a
local session and on a standalone cluster on loopback (`spark://`); the refusals are in `make test`, on any
machine: with or without pyspark, Java is pointed at nothing.
"""

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_core.config import ConfigError, DownloadConfig, FilterConfig
from sd_core.data import download_guard
from sd_core.data.filter import filter_metadata
from sd_core.data.image_server import ImageServer
from sd_core.data.shards import ShardDownloadError, ShardReport, download_shard
from sd_core.data.synthetic import generate_synthetic

HAVE_PYSPARK = importlib.util.find_spec("pyspark") is not None
SPARK = DownloadConfig(image_size=32, thread_count=2, timeout_s=30, distributor="pyspark")  # local[2]
MULTIPROCESSING = DownloadConfig(image_size=32, thread_count=2, timeout_s=30)


def _filtered_part(tmp_path: Path) -> Path:
    """Shard part 00000 of a synthetic source through the real filter (with its missing and corrupt URLs)."""
    generate_synthetic(tmp_path / "meta.parquet", rows=60, seed=3, image_size=64)
    filter_metadata([tmp_path / "meta.parquet"], tmp_path / "parts", FilterConfig(min_side=64), shard_size=40)
    return tmp_path / "parts" / "00000.parquet"


def _shard_contents(shards_dir: Path) -> dict[str, dict]:
    """Per sample key of ``00000.tar``: its caption, its json's url and hash, and its row's status."""
    with tarfile.open(shards_dir / "00000.tar") as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    samples = {}
    for name, data in files.items():
        key, ext = name.rsplit(".", 1)
        samples.setdefault(key, {})[ext] = data
    rows = {r["key"]: r["status"] for r in pq.read_table(shards_dir / "00000.parquet").to_pylist()}
    return {key: {"caption": s["txt"].decode(), "url": json.loads(s["json"])["url"],
                  "hash": json.loads(s["json"])["hash"], "has_image": "jpg" in s, "status": rows[key]}
            for key, s in samples.items()}


def _counts(report: ShardReport) -> dict:
    return {"rows": report.rows, "successes": report.successes, "failures": report.failures,
            "failed_to_download": report.failed_to_download, "failed_to_resize": report.failed_to_resize}


def _spark_processes_of_this_test() -> list[str]:
    """Spark's JVM and Python daemon/workers still running that were started for this process's downloads
    (their environment carries our pid as the download's parent)."""
    mark = f"{download_guard.PARENT_ENV}={os.getpid()}".encode()
    left = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"pyspark" in cmd or b"org.apache.spark" in cmd) and mark in env:
            left.append(f"{d.name}: {cmd[:120].decode(errors='replace')}")
    return left


# -------------------------------------------------------------------------------------- the refusals (fast)
def test_ray_is_refused_by_the_config_naming_the_field():
    """img2dataset's ray distributor without ray reports success having downloaded nothing: not offered."""
    with pytest.raises(ConfigError, match=r"download.distributor = 'ray': must be one of 'multiprocessing', "
                                          r"'pyspark'"):
        DownloadConfig(distributor="ray")


@pytest.mark.parametrize("java_at", ["JAVA_HOME", "PATH"])
def test_pyspark_without_java_or_pyspark_is_refused_before_anything_starts(tmp_path, monkeypatch, java_at):
    """Java pointed at nothing (an empty JAVA_HOME, or a PATH without java): the shard fails at once with
    what to install, naming the field; no img2dataset is started and nothing is written."""
    empty = tmp_path / "nothing"
    empty.mkdir()
    if java_at == "JAVA_HOME":
        monkeypatch.setenv("JAVA_HOME", str(empty))
    else:
        monkeypatch.delenv("JAVA_HOME", raising=False)
        monkeypatch.setenv("PATH", str(empty))
    part = tmp_path / "part.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a red circle"]}), part)
    logs: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(ShardDownloadError) as err:
        download_shard(part, tmp_path / "shards", "00000", SPARK, log=logs.append, allow_hosts=["127.0.0.1:9"])
    message = str(err.value)
    assert "download.distributor = 'pyspark'" in message and "make spark" in message, message
    expected = "needs Java, and no working java was found" if HAVE_PYSPARK else "pyspark is not installed"
    assert expected in message, message
    assert time.monotonic() - t0 < 30 and not logs  # refused before img2dataset was started
    assert not any((tmp_path / "shards").iterdir())


@pytest.mark.slow  # needs pyspark: `make test-slow` installs it first (`make spark`); never skipped silently
def test_the_guarded_child_fails_loudly_when_spark_cannot_start(tmp_path):
    """Behind that check, the child itself: a Spark session that cannot start (JAVA_HOME at nothing) is a
    non-zero exit naming the field, never an exit 0 without a shard."""
    (tmp_path / "args.json").write_text(json.dumps({"distributor": "pyspark", "spark_master": "local[2]"}))
    env = {**os.environ, "JAVA_HOME": str(tmp_path), download_guard.POLICY_ENV: "[]"}
    res = subprocess.run([sys.executable, "-m", "sd_core.data.download_guard", str(tmp_path / "args.json")],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == download_guard.EXIT_NO_SPARK, (res.returncode, res.stderr[-2000:])
    assert "download.distributor = 'pyspark': could not start a Spark session on local[2]" in res.stderr


# --------------------------------------------------------------------------------------- the Spark runs (slow)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standalone_cluster(tmp_path, monkeypatch):
    """A Spark standalone cluster on loopback: one master and one worker (2 cores), started the way a cluster's
    machines start theirs (``spark-class ...Master`` / ``...Worker spark://HOST:PORT``). Yields (master URL,
    the worker's work folder, where its executors' output goes)."""
    import pyspark

    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # the driver too: loopback only
    env = {**os.environ, "SPARK_HOME": os.path.dirname(pyspark.__file__)}
    spark_class = str(Path(sys.executable).parent / "spark-class")
    port, work = _free_port(), tmp_path / "spark-worker"
    master_log = tmp_path / "master.log"
    procs = [subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(_free_port())],
                              stdout=master_log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True),
             subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                               "--cores", "2", "--memory", "1g", "--webui-port", str(_free_port()), "--work-dir",
                               str(work), f"spark://127.0.0.1:{port}"],
                              stdout=(tmp_path / "worker.log").open("wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)]
    try:
        deadline = time.monotonic() + 240
        while "Registering worker" not in master_log.read_text(errors="replace"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), master_log.read_text()
            time.sleep(0.5)
        yield f"spark://127.0.0.1:{port}", work
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pyspark_locally_and_on_a_cluster_writes_the_same_shard_as_multiprocessing(tmp_path, standalone_cluster):
    """``local[2]`` (the default) and a ``spark://`` master: the same keys, captions, urls, hashes, per-row
    status and counts as the multiprocessing distributor, for the same filtered part."""
    master, worker_dir = standalone_cluster
    part = _filtered_part(tmp_path)
    runs = {"multiprocessing": MULTIPROCESSING, "pyspark local[2]": SPARK,
            "pyspark cluster": dataclasses.replace(SPARK, spark_master=master)}
    reports, timings = {}, {}
    with ImageServer() as server:
        for i, (name, cfg) in enumerate(runs.items()):
            t0 = time.monotonic()
            reports[name] = download_shard(part, tmp_path / f"shards{i}", "00000", cfg, rewrite=server.rewrite,
                                           allow_hosts=[server.authority])
            timings[name] = round(time.monotonic() - t0, 1)
    print(f"\nshard download wall time (s): {timings}")
    contents = {name: _shard_contents(tmp_path / f"shards{i}") for i, name in enumerate(runs)}
    for name in runs:
        assert contents[name] == contents["multiprocessing"], name  # keys, captions, urls, hashes, status
        assert _counts(reports[name]) == _counts(reports["multiprocessing"]), name
    rows = pq.read_table(part).num_rows
    assert reports["pyspark local[2]"].rows == rows and 0 < reports["pyspark local[2]"].successes < rows
    # On the cluster the guard ran in the worker's executor: its mark is in the executor's own output there.
    executor_output = "".join(f.read_text(errors="replace") for f in worker_dir.rglob("std*") if f.is_file())
    assert download_guard.WORKER_MARK in executor_output
    assert not _spark_processes_of_this_test()  # no driver JVM or Python worker outlives its download


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_url_policy_is_enforced_in_the_spark_workers(tmp_path):
    """A part that skipped the filter, with URLs at a second loopback service (directly, as ``localhost``,
    and by a redirect from the allowed server), a local file and the metadata endpoint: under Spark they are
    refused with the policy's reason and the forbidden service never sees a request."""
    shape = "/shapes/circle/red/white/64x64/{}.png"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the shard")
    with ImageServer() as allowed, ImageServer() as forbidden:
        good = [allowed.base_url + shape.format(1), allowed.base_url + shape.format(2)]
        hostile = [forbidden.base_url + shape.format(3), f"http://localhost:{forbidden.port}" + shape.format(4),
                   allowed.base_url + "/redirect?to=" + quote(forbidden.base_url + shape.format(5), safe=""),
                   secret.as_uri(), "http://169.254.169.254/latest/meta-data/"]
        urls = good[:1] + hostile + good[1:]
        part = tmp_path / "00000.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), part)
        report = download_shard(part, tmp_path / "shards", "00000", SPARK, allow_hosts=[allowed.authority])
        assert forbidden.requests == 0
    assert report.successes == len(good) and report.refused_by_url_policy == len(hostile), report.failures
    refused = {r["url"]: r["error_message"] for r in pq.read_table(tmp_path / "shards" / "00000.parquet").to_pylist()
               if r["status"] != "success"}
    assert set(refused) == set(hostile) and all("url policy" in m for m in refused.values()), refused
    assert "redirect refused" in refused[hostile[2]]
    assert not _spark_processes_of_this_test()
