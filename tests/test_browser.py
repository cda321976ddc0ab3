"""A real browser opens the UI's asset graph: headless Chromium (Debian's `chromium`, installed by
`make browser`) driven over the DevTools protocol, so the test waits for the graph to render in real time
instead of guessing a budget. Asserts every asset's name is in the page's text and saves a screenshot to
`test-artifacts/asset_graph.png`."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from e2e_support import IMMEDIATE_INSTANCE, ROOT, graphql, http_get, make_home, process_group, webserver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
ASSETS_QUERY = ("{ assetNodes { assetKey { path } groupName description kinds "
                "repository { name location { name } } } }")


class DevTools:
    """The few DevTools-protocol calls this test needs, over one page's websocket."""

    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:  # skip events and other replies
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    def text(self) -> str:
        res = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                        returnByValue=True)
        return res["result"].get("value") or ""

    def close(self) -> None:
        self.ws.close()


def open_devtools(profile: Path, timeout: float = 60) -> DevTools:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        assert time.monotonic() < deadline, "chromium did not open its DevTools port"
        time.sleep(0.2)
    port = int(port_file.read_text().split()[0])
    pages = [t for t in json.loads(http_get(f"http://127.0.0.1:{port}/json/list")) if t["type"] == "page"]
    return DevTools(pages[0]["webSocketDebuggerUrl"])


def expanded_graph_url(port: int, nodes: list[dict[str, Any]]) -> str:
    """The asset graph with every group expanded (the UI's ⌥E): group ids as the UI builds them, with and
    without its per-code-location grouping flag."""
    groups = set()
    for n in nodes:
        groups.add(f"global@global:{n['groupName']}")
        groups.add(f"{n['repository']['name']}@{n['repository']['location']['name']}:{n['groupName']}")
    return f"http://127.0.0.1:{port}/asset-groups?expanded={','.join(sorted(groups))}"


def render(url: str, names: list[str], scratch: Path, timeout: float = 90) -> tuple[str, bytes]:
    """Open ``url`` in headless Chromium and wait (up to ``timeout``) until every one of ``names`` is in the
    page's text; returns that text and a PNG screenshot."""
    profile = scratch / "chromium-profile"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--window-size=1600,1000", "about:blank"]
    with process_group(args, {"HOME": str(scratch), "PATH": "/usr/bin:/bin"}, scratch / "chromium.log"):
        tools = open_devtools(profile)
        try:
            tools.call("Page.enable")
            tools.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while True:
                text = tools.text()
                if all(a in text for a in names) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            time.sleep(1)  # let the last frame paint
            shot = tools.call("Page.captureScreenshot", format="png")["data"]
        finally:
            tools.close()
    return text, base64.b64decode(shot)


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    """The webserver on a fresh instance, shared by this module's tests: (its port, a scratch folder)."""
    scratch = tmp_path_factory.mktemp("browser")
    home = make_home(scratch / "dagster_home", IMMEDIATE_INSTANCE)
    with webserver(home, scratch / "data", scratch / "webserver.log") as port:
        yield port, scratch


@pytest.fixture(scope="module")
def nodes(ui) -> list[dict[str, Any]]:
    return graphql(ui[0], ASSETS_QUERY)["data"]["assetNodes"]


def test_every_asset_has_a_group_a_description_and_kinds(nodes):
    # what the graph shows besides names
    assert nodes, "the code location has no assets"
    bare = [n["assetKey"]["path"] for n in nodes if not (n["groupName"] and n["description"] and n["kinds"])]
    assert not bare, f"assets without group, description or kinds: {bare}"


def test_asset_graph_in_headless_chromium(ui, nodes):
    assert Path(CHROMIUM).exists(), "chromium is not installed: run `make browser` (apt-get install chromium)"
    port, scratch = ui
    names = sorted("/".join(n["assetKey"]["path"]) for n in nodes)
    graphql(port, "mutation { setNuxSeen }")  # no "join the community" dialog over the graph
    text, shot = render(expanded_graph_url(port, nodes), names, scratch)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "asset_graph.png").write_bytes(shot)
    (ARTIFACTS / "asset_graph.txt").write_text(text)
    missing = [a for a in names if a not in text]
    assert not missing, f"asset names not on the page: {missing}\npage text:\n{text[:2000]}"
    assert all(n["groupName"] in text for n in nodes)
    assert "Global asset lineage" in text
