"""The URL policy, written as the attack: metadata rows pointing at local files, data URIs, services on this
host, the cloud metadata endpoint and private networks, and redirects from the allowed server to a forbidden
one. None of their bytes may reach a shard tar; the funnel and the shard report count them. Real DuckDB,
real Dagster, real img2dataset over real loopback HTTP."""

import base64
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_assets.assets.data import filtered_metadata, laion_metadata
from sd_assets.resources import SDConfig
from sd_core.config import ConfigError, DownloadConfig, FilterConfig, Profile
from sd_core.data.filter import existing_parts, filter_metadata
from sd_core.data.image_server import ImageServer
from sd_core.data.shards import download_shard
from sd_core.data.url_policy import UrlPolicy, address_kind

HOSTILE = {
    "file:///etc/passwd": "scheme 'file'",
    "data:image/png;base64,iVBORw0KGgo=": "scheme 'data'",
    "ftp://ftp.example/a.jpg": "scheme 'ftp'",
    "javascript:alert(1)": "scheme 'javascript'",
    " <URL:file:///etc/hosts>": "scheme 'file'",  # urllib unwraps this
    "http://127.0.0.1:8080/a.jpg": "127.0.0.1:8080 is loopback",
    "http://localhost:8080/a.jpg": "'localhost' is loopback",
    "HTTP://LocalHost./a.jpg": "'localhost' is loopback",
    "http://[::1]:9000/a.jpg": "[::1]:9000 is loopback",
    "http://[::ffff:127.0.0.1]/a.jpg": "loopback (IPv4 127.0.0.1 inside IPv6)",
    "http://169.254.169.254/latest/meta-data/": "169.254.169.254:80 is link-local",
    "http://[fe80::1]/a.jpg": "link-local",
    "http://10.0.0.1/a.jpg": "10.0.0.1:80 is private",
    "http://192.168.1.7/a.jpg": "private",
    "http://[fd00::5]/a.jpg": "private",
    "http://0.0.0.0/a.jpg": "0.0.0.0:80 is unspecified",
    "http://2130706433/a.jpg": "127.0.0.1:80 is loopback",  # the resolver's legacy IPv4 spellings
    "http://0x7f.1/a.jpg": "127.0.0.1:80 is loopback",
    "http://127.1/a.jpg": "127.0.0.1:80 is loopback",
    "http://example.com@127.0.0.1/a.jpg": "127.0.0.1:80 is loopback",  # the host is after the "@"
    "http://１２７.０.０.１/a.jpg": "127.0.0.1:80 is loopback",  # fullwidth digits resolve like ASCII ones
    "http:///a.jpg": "no host",
}
PUBLIC = ["https://example.com/a.jpg", "HTTPS://Img.Example.COM/A.JPG?w=5#x", "https://8.8.8.8/a.jpg",
          "http://[2606:4700::1111]:8080/a.jpg", "https://example.com./a.jpg", "http://images.example:8443/a"]


@pytest.mark.parametrize("url,reason", list(HOSTILE.items()))
def test_hostile_urls_are_refused_with_their_reason(url, reason):
    refusal = UrlPolicy().url_refusal(url)
    assert refusal is not None and refusal.startswith("url policy: ") and reason in refusal


@pytest.mark.parametrize("url", PUBLIC)
def test_public_urls_pass(url):
    assert UrlPolicy().url_refusal(url) is None


def test_the_allow_list_opens_exactly_what_it_names():
    policy = UrlPolicy.from_entries(["127.0.0.1:8000", "10.1.0.0/16", "images.internal", "[::1]:9000"])
    assert policy.url_refusal("http://127.0.0.1:8000/a.png") is None
    assert "loopback" in policy.url_refusal("http://127.0.0.1:8001/a.png")  # same host, other port
    assert "'localhost' is loopback" in policy.url_refusal("http://localhost:8000/a.png")  # other spelling
    assert policy.url_refusal("http://10.1.200.3/a.png") is None
    assert "private" in policy.url_refusal("http://10.2.0.1/a.png")
    assert policy.url_refusal("http://[::1]:9000/") is None and policy.url_refusal("http://images.internal/") is None
    assert policy.address_refusal("127.0.0.1", 8000) is None
    assert "127.0.0.1:8001 is loopback" in policy.address_refusal("127.0.0.1", 8001)
    assert "loopback (IPv4 127.0.0.1 inside IPv6)" in policy.address_refusal("::ffff:127.0.0.1", 80)
    assert address_kind(ipaddress.ip_address("100.64.0.1")) == "not globally routable"


@pytest.mark.parametrize("entry,message", [
    ("10.0.0.1:99999", "filter.allow_hosts: allow-list entry '10.0.0.1:99999': port '99999' is not a number"),
    ("http://x/", "filter.allow_hosts: allow-list entry 'http://x/' is not an IP network"),
    ("a b", "filter.allow_hosts: allow-list entry 'a b' is not a host name or address"),
    ("[::1", "filter.allow_hosts: allow-list entry '[::1': expected [IPv6] or [IPv6]:port"),
])
def test_a_bad_allow_list_entry_is_a_config_error_naming_it(entry, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Profile.tiny("/tmp/unused").with_overrides({"filter": {"allow_hosts": [entry]}})


def _laion_rows(urls: list[str]) -> pa.Table:
    """LAION-schema rows that pass every quality filter: only their URLs decide."""
    n = len(urls)
    return pa.table({"URL": urls, "TEXT": [f"a red circle on a white background number {i}" for i in range(n)],
                     "WIDTH": pa.array([512] * n, pa.int32()), "HEIGHT": pa.array([512] * n, pa.int32()),
                     "similarity": [0.35] * n, "punsafe": pa.array([0.01] * n, pa.float32()),
                     "pwatermark": pa.array([0.01] * n, pa.float32()),
                     "aesthetic": pa.array([7.0] * n, pa.float32()), "hash": pa.array(range(n), pa.int64())})


def test_the_filter_drops_hostile_rows_in_its_own_funnel_stage(tmp_path):
    good = [f"https://img{i}.example.com/{i}.jpg" for i in range(10)] + PUBLIC
    src = tmp_path / "meta.parquet"
    pq.write_table(_laion_rows(good[:5] + list(HOSTILE) + good[5:]), src)
    report = filter_metadata([src], tmp_path / "out", FilterConfig(), shard_size=100)
    assert list(report.removed_by)[:2] == ["url", "url_policy"]
    assert report.removed_by["url_policy"] == len(HOSTILE) and report.rows_out == len(good)
    assert f"| url_policy | {len(HOSTILE)} | {len(good)} |" in report.funnel_markdown()
    kept = pq.read_table(existing_parts(tmp_path / "out")["00000"]).column("url").to_pylist()
    assert kept == good

    allowed = filter_metadata([src], tmp_path / "allowed", FilterConfig(allow_hosts=("10.0.0.1", "127.0.0.1:8080")),
                              shard_size=100)
    assert allowed.removed_by["url_policy"] == len(HOSTILE) - 2
    kept = pq.read_table(existing_parts(tmp_path / "allowed")["00000"]).column("url").to_pylist()
    assert {"http://10.0.0.1/a.jpg", "http://127.0.0.1:8080/a.jpg"} <= set(kept)


def test_the_filtered_metadata_asset_shows_the_url_policy_stage(tmp_path):
    src = tmp_path / "laion.parquet"
    pq.write_table(_laion_rows([f"https://img.example.com/{i}.jpg" for i in range(6)] + list(HOSTILE)), src)
    sd = SDConfig(profile="tiny", data_root=str(tmp_path / "data"),
                  overrides={"source": {"kind": "parquet", "uri": str(src)}, "download": {"shard_size": 4}})
    with dg.instance_for_test() as instance:
        res = dg.materialize([laion_metadata, filtered_metadata], instance=instance, resources={"sd": sd})
        assert res.success
        meta = res.asset_materializations_for_node("filtered_metadata")[0].metadata
        assert meta["removed_by"].value["url_policy"] == len(HOSTILE) and meta["rows_out"].value == 6
        assert f"| url_policy | {len(HOSTILE)} |" in meta["funnel"].value
        assert [(c.check_name, c.passed) for c in res.get_asset_check_evaluations()] == [("thresholds_hold", True)]
        assert instance.get_dynamic_partitions("shards") == ["00000", "00001"]


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def _attack_rows(tmp_path: Path, allowed: ImageServer, forbidden: ImageServer) -> tuple[list[str], list[str]]:
    """(good URLs, hostile URLs) of a shard part that skipped the filter (e.g. written before it existed)."""
    shape = "/shapes/circle/red/white/64x64/{}.png"
    private_png = tmp_path / "private.png"
    private_png.write_bytes(_png_bytes((0, 255, 255)))
    on_forbidden = forbidden.base_url + shape.format(7)
    good = [allowed.base_url + shape.format(1), allowed.base_url + shape.format(2),
            allowed.base_url + "/redirect?to=" + quote(allowed.base_url + shape.format(3), safe="")]
    hostile = [
        "file:///etc/passwd", private_png.as_uri(),
        "data:image/png;base64," + base64.b64encode(_png_bytes((255, 0, 255))).decode(),
        on_forbidden,  # a second loopback service, not the allowed one
        f"http://[::1]:{forbidden.port}" + shape.format(8), f"http://localhost:{forbidden.port}" + shape.format(9),
        "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.jpg", f"ftp://127.0.0.1:{forbidden.port}/x",
        allowed.base_url + "/redirect?to=" + quote(on_forbidden, safe=""),  # redirects must not escape
        allowed.base_url + "/redirect?to=" + quote(f"http://localhost:{forbidden.port}" + shape.format(5), safe=""),
        allowed.base_url + "/redirect?to=" + quote("file:///etc/passwd", safe=""),
    ]
    host = socket.gethostname()  # a name (no IP literal: passes any syntactic check) that resolves locally
    try:
        if address_kind(ipaddress.ip_address(socket.gethostbyname(host))) is not None:
            hostile.append(f"http://{host}:{forbidden.port}" + shape.format(6))
    except OSError:
        pass
    return good, hostile


def test_hostile_urls_in_a_shard_part_never_reach_the_tar(tmp_path):
    with ImageServer() as allowed, ImageServer() as forbidden:
        good, hostile = _attack_rows(tmp_path, allowed, forbidden)
        urls = good[:1] + hostile[:6] + good[1:] + hostile[6:]
        part = tmp_path / "00000.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))],
                                 "hash": pa.array(range(len(urls)), pa.int64())}), part)
        cfg = DownloadConfig(image_size=32, thread_count=4, timeout_s=10)
        report = download_shard(part, tmp_path / "shards", "00000", cfg, allow_hosts=[allowed.authority])
        assert forbidden.requests == 0  # not one request reached the forbidden service, redirected or not
    assert report.successes == len(good) and report.refused_by_url_policy == len(hostile)
    assert report.failed_to_download == len(hostile)
    assert any("url policy" in reason for reason in report.failures), report.failures
    rows = pq.read_table(tmp_path / "shards" / "00000.parquet").to_pylist()
    refused = {r["url"]: r["error_message"] for r in rows if r["status"] != "success"}
    assert set(refused) == set(hostile)
    assert all("url policy" in msg for msg in refused.values()), refused
    assert "redirect refused" in refused[hostile[9]] and "redirect refused" in refused[hostile[11]]
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    sample_urls = [json.loads(v)["url"] for k, v in members.items() if k.endswith(".json")]
    assert sorted(sample_urls) == sorted(good) and sum(k.endswith(".jpg") for k in members) == len(good)
    blob = b"".join(members.values())
    assert b"root:" not in blob and b"/bin/" not in blob  # nothing of /etc/passwd


_CONNECT_PROBE = """
import socket, sys
from sd_core.data.download_guard import install_guard
from sd_core.data.url_policy import UrlPolicy
install_guard(UrlPolicy.from_entries(sys.argv[2:]))
for host in ("localhost", "127.0.0.1", "::ffff:127.0.0.1"):
    try:
        socket.create_connection((host, int(sys.argv[1])), timeout=5).close()
        print(host, "connected")
    except OSError as e:
        print(host, "refused:", e)
"""


def test_the_socket_guard_checks_the_resolved_address_of_every_connect():
    """Below urllib: a name that resolves to loopback, and the IPv4-mapped spelling, are refused at connect;
    the allowed host:port still connects."""
    with ImageServer() as forbidden, ImageServer() as allowed:
        out = subprocess.run([sys.executable, "-c", _CONNECT_PROBE, str(forbidden.port), allowed.authority],
                             capture_output=True, text=True, timeout=60)
        ok = subprocess.run([sys.executable, "-c", _CONNECT_PROBE, str(allowed.port), allowed.authority],
                            capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all("refused: url policy: address" in line for line in lines), lines
    assert lines[2].endswith("is loopback (IPv4 127.0.0.1 inside IPv6)")
    assert "127.0.0.1 connected" in ok.stdout


def test_the_downloader_refuses_to_run_without_its_policy(tmp_path):
    """Fail closed: started any other way than through sd_core.data.shards, nothing is downloaded."""
    (tmp_path / "args.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "SD_URL_POLICY_ALLOW"}
    res = subprocess.run([sys.executable, "-m", "sd_core.data.download_guard", str(tmp_path / "args.json")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "refusing to download without the URL policy" in res.stderr
