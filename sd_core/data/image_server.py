"""A loopback HTTP server for the synthetic source's images, so img2dataset downloads them over real HTTP.

``with ImageServer() as server:`` binds 127.0.0.1 on a free port, serves from a thread of this process (no
child process that could be orphaned) and shuts down on exit. Images are rendered on request from the URL
path alone (`sd_core.data.synthetic.render_url_path`), so nothing has to be written to disk first:

- ``/shapes/{shape}/{color}/{background}/{W}x{H}/{seed}.png`` → 200, a PNG of W×H px;
- ``/missing/...`` → 404 (the planted broken URLs);
- ``/corrupt/...`` → 200 with ``Content-Type: image/png`` and bytes no decoder accepts (planted corrupt images);
- ``/redirect?to=URL`` → 302 to ``URL`` (tests: a redirect must not lead the downloader past the URL policy);
- anything else → 404.

The metadata carries `SYNTHETIC_BASE_URL` as its host; `ImageServer.rewrite` maps such a URL to this
server's live address.
"""

from __future__ import annotations

import hashlib
import io
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from sd_core.data.synthetic import SYNTHETIC_BASE_URL, render_url_path


@lru_cache(maxsize=4096)
def _png_bytes(path: str) -> bytes:
    buf = io.BytesIO()
    render_url_path(path).save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_bytes(path: str) -> bytes:
    """A PNG signature followed by deterministic junk: looks like an image, decodes as nothing."""
    junk = hashlib.sha256(path.encode()).digest() * 16
    return b"\x89PNG\r\n\x1a\n" + junk


class _Handler(BaseHTTPRequestHandler):
    server_version = "sd-pipeline-shapes/1"

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        parts = urlsplit(self.path)
        path = parts.path
        self.server.requests += 1  # type: ignore[attr-defined]
        if path == "/redirect" and parse_qs(parts.query).get("to"):
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/shapes/"):
            try:
                body = _png_bytes(path)
            except ValueError:
                self._send(404, b"not a synthetic image path\n", "text/plain")
                return
            self._send(200, body, "image/png")
        elif path.startswith("/corrupt/"):
            self._send(200, _corrupt_bytes(path), "image/png")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeouts): nothing to do
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        return


class ImageServer:
    """The synthetic image server on 127.0.0.1 (``port=0``: any free port). A context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ImageServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._httpd is not None:
            return
        httpd = ThreadingHTTPServer((self._host, self._port), _Handler)
        httpd.daemon_threads = True
        httpd.requests = 0  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sd-image-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ImageServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def authority(self) -> str:
        """``host:port``: the URL policy's allow-list entry for exactly this server."""
        return f"{self._host}:{self.port}"

    @property
    def requests(self) -> int:
        """GET requests served so far (for tests)."""
        return int(self._httpd.requests) if self._httpd is not None else 0  # type: ignore[attr-defined]

    def rewrite(self, url: str | None) -> str | None:
        """Map a placeholder URL (`SYNTHETIC_BASE_URL`) to this server; other URLs are returned unchanged."""
        if url is not None and url.startswith(SYNTHETIC_BASE_URL + "/"):
            return self.base_url + url[len(SYNTHETIC_BASE_URL):]
        return url
