"""``upfeat serve``: a small local web demo (standard library ``http.server`` only).

Upload an image, pick a backbone and an upsampler, and see image | low-res features | upsampled
features as PCA colours, with the time taken (the work is done by :class:`upfeat.demo.Demo`).
Endpoints:

- ``GET /``: the page; ``GET /api/options``: :meth:`Demo.options` as JSON.
- ``POST /api/run?backbone=B&upsampler=U&name=FILE``: the raw image file as the body; answers
  :meth:`Demo.run`'s JSON, or ``{"error": "one line"}`` with status 400 (bad choice, not an
  image, empty), 404, 411 (no length), 413 (over the upload limit; refused before the body is
  read when the client sends ``Expect: 100-continue``) or 500 (model failed to load or run).
"""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
import traceback
import webbrowser
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from ._serve_page import render_page
from .demo import DEFAULT_BACKBONE, MB, Demo, DemoError, DemoSettings

__all__ = ["DemoServer", "make_server", "serve"]


class DemoServer(ThreadingHTTPServer):
    """A threaded HTTP server holding a :class:`Demo`; ``url`` is where to point a browser."""

    daemon_threads = True

    def __init__(self, host: str, port: int, demo: Demo, quiet: bool = False) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.demo, self.quiet = demo, quiet
        name = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else \
            f"[{host}]" if ":" in host else host
        self.url = f"http://{name}:{self.server_address[1]}/"

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left: no trace
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue lets us refuse early
    timeout = 60  # seconds a silent client may hold a thread

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _too_large(self) -> str | None:
        """The 413 message if the announced body is over the limit, else ``None``."""
        limit = self.server.demo.settings.max_upload_bytes
        length = int(self.headers.get("Content-Length") or 0)
        if length <= limit:
            return None
        return (f"upload is {length / MB:.1f} MB, over the {limit / MB:g} MB limit of this "
                f"server (start it with `upfeat serve --max-upload-mb N` to allow more)")

    def handle_expect_100(self) -> bool:  # refuse before the client sends the body
        if (msg := self._too_large()) is not None:
            self.close_connection = True
            self._json(413, {"error": msg})
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, render_page(self.server.demo.options()), "text/html; charset=utf-8")
        elif path == "/api/options":
            self._json(200, self.server.demo.options())
        else:
            self._json(404, {"error": f"no page {path}"})

    def do_POST(self) -> None:  # noqa: N802
        status, answer = self._run()
        self._json(status, answer)

    def _run(self) -> tuple[int, dict]:
        """Status and JSON answer of ``POST /api/run``; never raises."""
        url = urlsplit(self.path)
        try:
            if url.path != "/api/run":
                raise DemoError(404, f"no endpoint {url.path}; POST the image to /api/run")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise DemoError(411, "send the image with a Content-Length header")
            if (msg := self._too_large()) is not None:
                self._discard(int(length))
                raise DemoError(413, msg)
            data = self.rfile.read(int(length))
            if not data:
                raise DemoError(400, "empty upload: choose an image file")
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            choice = q.get("backbone", DEFAULT_BACKBONE), q.get("upsampler", "bilinear")
            return 200, self.server.demo.run(data, *choice, q.get("name", "upload"))
        except DemoError as e:
            return e.status, {"error": str(e)}
        except Exception as e:  # a bug or out of memory: one line on the page, the trace in the log
            self.log_error("%s", traceback.format_exc())
            return 500, {"error": f"internal error ({type(e).__name__}: {e}); see the server log"}

    def _discard(self, length: int, cap: int = 256 * MB) -> None:
        """Read and drop an oversized body (up to ``cap``) so the client can read our 413."""
        if length > cap:
            self.close_connection = True
            return
        while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
            length -= len(chunk)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base signature)
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20.0,
                max_side: int = 640, quiet: bool = False) -> DemoServer:
    """A ready (bound, not yet serving) demo server; ``port=0`` picks a free port."""
    if not max_upload_mb > 0:
        raise ValueError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    if max_side < 16:
        raise ValueError(f"max_side must be at least 16 pixels, got {max_side}")
    demo = Demo(DemoSettings(max_upload_bytes=int(max_upload_mb * MB), max_side=max_side))
    return DemoServer(host, port, demo, quiet=quiet)


def serve(host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20.0,
          max_side: int = 640, open_browser: bool = False,
          echo: Callable[[str], object] = print) -> None:
    """Run the demo until Ctrl-C, telling ``echo`` the URL (and a warning off loopback)."""
    server = make_server(host, port, max_upload_mb, max_side)
    try:
        echo(f"upfeat demo at {server.url} (Ctrl-C to stop)")
        if not _is_loopback(host):
            echo(f"warning: listening on {host}, reachable from other machines, without "
                 f"authentication; use --host 127.0.0.1 to keep it local")
        if open_browser:
            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
