"""Hosts as network namespaces: each "host" is a namespace joined to the root namespace by a veth pair on a bridge,
with an address of our own, and no route anywhere else. Redis (a private ``redis-server``) and the PACS (the session
Orthanc behind the counting proxy) listen on the bridge's address in the root namespace, the "server" side; workers
run inside the namespaces with ``ip netns exec`` and reach them only by that address.

What reaches a host's C-MOVE receiver is counted in the host's own firewall: an nftables table of ours inside its
namespace counts the TCP connections opened to the receiver port and the bytes that arrive there
(:meth:`Host.count_tcp_to`).

Needs root, iproute2 and (for the C-MOVE test) nftables; CI is root and installs both. Elsewhere the tests skip with
the reason, under ``CI=true`` they fail. Everything is made under names starting with ``trolley-`` and removed by name
(namespaces, bridge, nftables table) or PID (processes), also before starting, in case an earlier run was killed before
its teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from testbed.orthanc import free_port
from tests.conftest import service_missing

SUBNET = "10.247.13"
"""A private /24 of our own: the bridge is .1, host i is .(10 + i)."""
BRIDGE = "trolley-br0"
SERVER = f"{SUBNET}.1"
COUNTER_TABLE = "trolley_count"
"""The nftables table (``inet`` family) that counts what reaches a port of a host; it lives in the host's namespace."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Host:
    """One namespace "host"."""

    name: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        """Every process in the namespace (``ip netns pids``)."""
        return [int(pid) for pid in ip("netns", "pids", self.name).stdout.split()]

    def count_tcp_to(self, port: int) -> None:
        """Count, in this host's own firewall, the TCP connections opened to ``port`` (SYN without ACK) and every byte
        that arrives at it; read with :meth:`tcp_counts`, removed with :meth:`stop_counting` (or the namespace)."""
        if shutil.which("nft") is None:
            service_missing("nftables is not installed (apt-get install -y nftables)")
        rules = (
            f"table inet {COUNTER_TABLE} {{\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    tcp dport {port} tcp flags & (syn | ack) == syn counter\n"
            f"    tcp dport {port} counter\n"
            "  }\n"
            "}\n"
        )
        self.stop_counting()
        self.nft("-f", "-", stdin=rules)

    def tcp_counts(self) -> tuple[int, int]:
        """(connections opened, bytes received) at the port given to :meth:`count_tcp_to`, IP headers included."""
        listing = json.loads(self.nft("-j", "list", "table", "inet", COUNTER_TABLE).stdout)
        counters = [
            expr["counter"]
            for item in listing["nftables"]
            if "rule" in item
            for expr in item["rule"]["expr"]
            if "counter" in expr
        ]
        connections, traffic = counters
        return int(connections["packets"]), int(traffic["bytes"])

    def stop_counting(self) -> None:
        self.nft("delete", "table", "inet", COUNTER_TABLE, check=False)

    def nft(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = ["ip", "netns", "exec", self.name, "nft", *args]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, check=check, timeout=30)

    def kill_all(self) -> list[int]:
        """SIGKILL every process of the host, as a power cut would."""
        killed = self.pids()
        for pid in killed:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=30)
        return killed


def _remove(names: list[str]) -> None:
    for name in names:
        if name.startswith("trolley-h"):
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", name, check=False)  # takes its end of the veth, and so the pair, with it
    ip("link", "del", BRIDGE, check=False)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    """Two namespace hosts, ``trolley-h1`` (10.247.13.11) and ``trolley-h2`` (.12), on the bridge ``trolley-br0``
    (10.247.13.1 in the root namespace)."""
    if os.geteuid() != 0:
        service_missing("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None:
        service_missing("iproute2 is not installed (apt-get install -y iproute2)")
    made = [Host(f"trolley-h{i}", f"{SUBNET}.{10 + i}") for i in (1, 2)]
    _remove([host.name for host in made])
    try:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{SERVER}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for index, host in enumerate(made, start=1):
            outside = f"trolley-v{index}"
            ip("netns", "add", host.name)
            ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("link", "set", outside, "master", BRIDGE, "up")
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.name, "link", "set", "eth0", "up")
            ip("-n", host.name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        _remove([host.name for host in made])
        service_missing(f"could not make network namespaces: {exc.stderr.strip()}")
    yield made
    for host in made:
        for process in host.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    _remove([host.name for host in made])


@pytest.fixture(scope="module")
def server_redis(hosts: list[Host], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private ``redis-server`` bound to the bridge address only; yields its URL. Stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    command = [
        str(binary), "--bind", SERVER, "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--protected-mode", "no",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{SERVER}:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server on {SERVER}:{port} did not start")
            time.sleep(0.05)
    client.close()
    yield url
    process.terminate()
    process.wait(timeout=30)


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
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
