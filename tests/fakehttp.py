"""The one tiny HTTP server of the tests: 127.0.0.1, a free port, a thread. For parsing and error-mapping tests and
for protocols without a public server (MINT, RAD-69) -- never a stand-in for Orthanc where Orthanc can do the job.

``FakeHTTPServer(handler)`` calls ``handler(request)`` for each GET/POST and sends back the ``Reply`` it returns. A
``bytes`` body gets a Content-Length; an iterable body is streamed and ends when the connection closes (HTTP/1.0),
so a short body is a clean EOF, as a server crash gives.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

from requests.structures import CaseInsensitiveDict


@dataclass
class FakeRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    raw_query: str
    headers: CaseInsensitiveDict[str]
    body: bytes = b""

    def param(self, name: str, default: str = "") -> str:
        return next((value for key, value in self.query if key == name), default)

    def params(self, name: str) -> list[str]:
        return [value for key, value in self.query if key == name]


@dataclass
class Reply:
    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class FakeHTTPServer:
    """Serves ``handler`` on a free port of 127.0.0.1 until closed. Records every request in ``requests``."""

    def __init__(self, handler: Callable[[FakeRequest], Reply]) -> None:
        self.handler = handler
        self.requests: list[FakeRequest] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = FakeRequest(
                    self.command,
                    parts.path,
                    parse_qsl(parts.query, keep_blank_values=True),
                    parts.query,
                    CaseInsensitiveDict(dict(self.headers.items())),
                    self.rfile.read(length) if length else b"",
                )
                outer.requests.append(request)
                reply = outer.handler(request)
                if reply.delay:
                    time.sleep(reply.delay)
                self.send_response(reply.status)
                headers = dict(reply.headers)
                if isinstance(reply.body, bytes):
                    headers.setdefault("Content-Length", str(len(reply.body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command == "HEAD":
                    return
                chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client may stop reading
                    for chunk in chunks:
                        self.wfile.write(chunk)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    stop = close

    def __enter__(self) -> FakeHTTPServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
