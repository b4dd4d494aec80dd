"""A local HTTP proxy in front of Orthanc, written for the engine tests: it counts concurrent requests (what the
PACS sees) and injects faults (statuses with Retry-After, truncated multipart bodies, delays), or random faults on
every request (:class:`Chaos`). It listens on 127.0.0.1, or on the address given (the namespace hosts' test listens
on its own bridge address), and records which client address made each request. It can be stopped (every open
connection cut, so the PACS is really gone) and started again on the same port (:meth:`PacsProxy.restart`)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

SEARCH_ENDINGS = ("/studies", "/series", "/instances")


def is_search(path: str) -> bool:
    """A QIDO-RS request (``.../studies``, ``.../series``, ``.../instances``, with or without a query string)."""
    return path.split("?", 1)[0].endswith(SEARCH_ENDINGS)


def is_retrieval(path: str) -> bool:
    """A request for instances: WADO-URI (``/wado?...``) or a WADO-RS retrieve (a study, series or instance)."""
    bare = path.split("?", 1)[0]
    return not is_search(path) and not bare.endswith("/metadata")


@dataclass
class Fault:
    """Answer requests whose path ends with (or contains) ``match`` with ``status`` (or a truncated body) for the
    next ``times`` requests (-1: always), after ``delay`` seconds."""

    match: str
    status: int = 0
    times: int = 1
    retry_after: str | None = None
    truncate: bool = False
    suffix: bool = True
    delay: float = 0.0
    served: int = 0
    answered: int = 0
    """Requests this fault has finished answering (the delay is over and the answer is written, or failed)."""

    def hits(self, path: str) -> bool:
        bare = path.split("?", 1)[0]
        return self.times != 0 and (bare.endswith(self.match) if self.suffix else self.match in bare)


CHAOS_KINDS = ("500", "502", "503", "429", "reset", "stall", "truncate", "cut")
"""What :class:`Chaos` does to a request it picks: a status (503 and 429 with ``Retry-After``), a TCP reset, a stall
longer than the client's timeout then a close, a body cut short with an honest length (a truncated multipart or
JSON), or a body cut short against its ``Content-Length`` (the connection closes mid-body)."""


@dataclass
class Chaos:
    """A fault on a ``rate`` share of every request, QIDO included, drawn from a seeded RNG."""

    rate: float = 0.2
    seed: int = 10
    stall: float = 4.0
    retry_after: str = "1"
    kinds: tuple[str, ...] = CHAOS_KINDS
    served: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, str]] = field(default_factory=list)
    """(kind, path) of every fault served."""
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self, path: str) -> str | None:
        """The fault for the next request, or None (called under the proxy's lock)."""
        if self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(self.kinds)
        self.served[kind] += 1
        self.log.append((kind, path))
        return kind


class PacsProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.chaos: Chaos | None = None
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[str] = []
        self.clients: list[tuple[str, str]] = []
        """(client address, path) of every request, in arrival order."""
        self._lock = threading.Lock()
        self._session = threading.local()
        self._connections: set[socket.socket] = set()
        self.host = host
        self.server = self._bind(port)
        self.port = self.server.server_address[1]
        self.thread: threading.Thread | None = None

    def _bind(self, port: int) -> ThreadingHTTPServer:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def handle(self) -> None:
                with contextlib.suppress(OSError, ValueError):  # a client reset between two kept-alive requests
                    super().handle()

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                with contextlib.suppress(OSError, ValueError):
                    super().finish()

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with contextlib.suppress(OSError, ValueError):  # a worker killed on purpose, a reset on purpose
                    proxy.handle(self)

        server = ThreadingHTTPServer((self.host, port), Handler)  # SO_REUSEADDR: the same port again at once
        server.daemon_threads = True
        return server

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> PacsProxy:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: clients with a kept-alive session see the PACS gone too."""
        if self.thread is None:
            return
        self.thread = None
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def restart(self) -> PacsProxy:
        """Listen again on the same port (after :meth:`stop`); faults, chaos and counters are kept."""
        self.server = self._bind(self.port)
        return self.start()

    def retrievals(self) -> list[str]:
        """The requests for instances seen so far (searches and metadata left out)."""
        with self._lock:
            return [path for path in self.requests if is_retrieval(path)]

    def searches(self) -> list[str]:
        with self._lock:
            return [path for path in self.requests if is_search(path)]

    def _fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits(path):
                    if fault.times > 0:
                        fault.times -= 1
                    fault.served += 1
                    return fault
        return None

    def _chaos(self, path: str) -> str | None:
        with self._lock:
            return self.chaos.draw(path) if self.chaos is not None else None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests.append(handler.path)
            self.clients.append((handler.client_address[0], handler.path))
        fault = None
        try:
            if self.delay:
                time.sleep(self.delay)
            fault = self._fault(handler.path)
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            chaos = self._chaos(handler.path)
            if chaos is not None and self._misbehave(handler, chaos):
                return
            if fault is not None and fault.status:
                self._answer(handler, fault.status, b"injected fault", retry_after=fault.retry_after)
                return
            session = getattr(self._session, "s", None) or requests.Session()
            self._session.s = session
            headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept", "accept-encoding")}
            upstream = session.get(self.upstream + handler.path, headers=headers, timeout=60)
            body = upstream.content
            length = len(body)
            if (fault is not None and fault.truncate) or chaos == "truncate":
                body = body[: len(body) // 2]  # whole HTTP framing, truncated multipart (or JSON) inside
                length = len(body)
            elif chaos == "cut":
                body = body[: len(body) // 2]  # the connection closes before Content-Length bytes came
                handler.close_connection = True
            content_type = upstream.headers.get("Content-Type", "application/octet-stream")
            handler.send_response(upstream.status_code)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(length))
            handler.end_headers()
            handler.wfile.write(body)
            if chaos == "cut":
                self._reset(handler)
        finally:
            with self._lock:
                self.in_flight -= 1
                if fault is not None:
                    fault.answered += 1

    def _misbehave(self, handler: BaseHTTPRequestHandler, kind: str) -> bool:
        """Do the chaos ``kind`` that needs no upstream answer; False for those that alter the upstream's."""
        if kind in ("500", "502"):
            self._answer(handler, int(kind), b"chaos")
        elif kind in ("503", "429"):
            self._answer(handler, int(kind), b"chaos", retry_after=self.chaos.retry_after if self.chaos else "1")
        elif kind == "reset":
            self._reset(handler)
        elif kind == "stall":
            time.sleep(self.chaos.stall if self.chaos else 0)
            self._reset(handler)
        else:
            return False
        return True

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, retry_after: str | None = None) -> None:
        handler.send_response(status)
        if retry_after is not None:
            handler.send_header("Retry-After", retry_after)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def _reset(handler: BaseHTTPRequestHandler) -> None:
        """Close the connection with a TCP RST (SO_LINGER 0), as a crashed server or a middlebox does."""
        connection = handler.connection
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        os.close(connection.detach())
