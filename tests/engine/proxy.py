"""A local HTTP proxy in front of Orthanc, written for the engine tests: it counts concurrent requests (what the
PACS sees) and injects faults (statuses with Retry-After, truncated multipart bodies, delays). It listens on
127.0.0.1, or on the address given (the namespace hosts' test listens on its own bridge address), and records which
client address made each request."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


@dataclass
class Fault:
    """Answer requests whose path ends with (or contains) ``match`` with ``status`` (or a truncated body) for the
    next ``times`` requests (-1: always)."""

    match: str
    status: int = 0
    times: int = 1
    retry_after: str | None = None
    truncate: bool = False
    suffix: bool = True
    served: int = 0

    def hits(self, path: str) -> bool:
        bare = path.split("?", 1)[0]
        return self.times != 0 and (bare.endswith(self.match) if self.suffix else self.match in bare)


class PacsProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[str] = []
        self.clients: list[tuple[str, str]] = []
        """(client address, path) of every request, in arrival order."""
        self._lock = threading.Lock()
        self._session = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a worker killed on purpose
                    proxy.handle(self)

        self.host = host
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> PacsProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits(path):
                    if fault.times > 0:
                        fault.times -= 1
                    fault.served += 1
                    return fault
        return None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests.append(handler.path)
            self.clients.append((handler.client_address[0], handler.path))
        try:
            if self.delay:
                time.sleep(self.delay)
            fault = self._fault(handler.path)
            if fault is not None and fault.status:
                body = b"injected fault"
                handler.send_response(fault.status)
                if fault.retry_after is not None:
                    handler.send_header("Retry-After", fault.retry_after)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
                return
            session = getattr(self._session, "s", None) or requests.Session()
            self._session.s = session
            headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept", "accept-encoding")}
            upstream = session.get(self.upstream + handler.path, headers=headers, timeout=60)
            body = upstream.content
            if fault is not None and fault.truncate:
                body = body[: len(body) // 2]  # whole HTTP framing, truncated multipart inside
            handler.send_response(upstream.status_code)
            handler.send_header("Content-Type", upstream.headers.get("Content-Type", "application/octet-stream"))
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        finally:
            with self._lock:
                self.in_flight -= 1
