"""Hosts as network namespaces: each "host" is a namespace joined to the root namespace by a veth pair on a bridge,
with an address of our own, and no route anywhere else (the helpers are :mod:`testbed.hosts`, shared with the bench).
Redis (a private ``redis-server``) and the PACS (the session Orthanc behind the counting proxy) listen on the bridge's
address in the root namespace, the "server" side; workers run inside the namespaces with ``ip netns exec`` and reach
them only by that address.

What reaches a host's C-MOVE receiver is counted in the host's own firewall: an nftables table of ours inside its
namespace counts the TCP connections opened to the receiver port and the bytes that arrive there
(:meth:`Host.count_tcp_to`).

Needs root, iproute2 and (for the C-MOVE test) nftables; CI is root and installs both. Elsewhere the tests skip with
the reason, under ``CI=true`` they fail. Everything is made under names starting with ``trolley-h`` / ``trolley-br0``
and removed by name (namespaces, bridge, nftables table) or PID (processes), also before starting, in case an earlier
run was killed before its teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from testbed.hosts import TESTS, Host, HostsUnavailable, namespace_hosts
from testbed.processes import stop
from testbed.redis_server import redis_server
from tests.conftest import service_missing

__all__ = ["SERVER", "Host", "worker_in"]

SERVER = TESTS.server
"""The bridge's address in the root namespace (10.247.13.1): the server side. Host i is 10.247.13.(10 + i)."""


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    """Two namespace hosts, ``trolley-h1`` (10.247.13.11) and ``trolley-h2`` (.12), on the bridge ``trolley-br0``
    (10.247.13.1 in the root namespace); see :mod:`testbed.hosts`."""
    try:
        with namespace_hosts(TESTS, 2) as made:
            yield made
    except HostsUnavailable as exc:
        service_missing(str(exc))


@pytest.fixture(scope="module")
def server_redis(hosts: list[Host], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private ``redis-server`` bound to the bridge address only; yields its URL. Stopped by PID."""
    try:
        with redis_server(tmp_path_factory.mktemp("redis"), bind=SERVER) as (url, _):
            yield url
    except RuntimeError as exc:  # it did not start
        pytest.fail(str(exc))


@pytest.fixture
def broker(server_redis: str) -> str:
    """The server's Redis, emptied first: messages of an earlier test (a host killed with batches reserved) never
    reach this test's workers."""
    client = redis.Redis.from_url(server_redis)
    client.flushdb()
    client.close()
    return server_redis


@contextmanager
def worker_in(
    host: Host, config: Path, log: Path, concurrency: int = 2, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``trolley-tasks worker`` inside the host's namespace, with ``env`` on top of ours (this host's own
    ``TROLLEY_*`` overrides); returns once it is ready. Stopped by PID."""
    environment = dict(os.environ, TROLLEY_CONFIG=str(config), PYTHONPATH=os.getcwd())
    environment.pop("TROLLEY_BROKER__URL", None)
    environment.update(env or {})
    node = f"{host.name.removeprefix('trolley-')}@%h"
    command = [
        "ip", "netns", "exec", host.name, sys.executable, "-m", "trolley_tasks.cli", "worker",
        "--concurrency", str(concurrency), "--hostname", node, "--loglevel", "info",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)
    host.processes.append(process)
    deadline = time.monotonic() + 60
    while b"ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"worker in {host.name} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield process
    finally:
        stop(process, timeout=30)
