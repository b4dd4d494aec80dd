"""Hosts as network namespaces, for ``tests/hosts`` and ``make bench``: each "host" is a namespace joined to the root
namespace by a veth pair on a bridge, with an address of our own, and no route anywhere else. Services listen on the
bridge's address in the root namespace (the "server" side); programs run inside a host with ``ip netns exec``.

What reaches a port of a host can be counted in the host's own firewall: an nftables table of ours inside its
namespace counts the TCP connections opened to the port and the bytes that arrive there (:meth:`Host.count_tcp_to`).

Needs root and iproute2 (nftables for the counters). Every caller picks its own names (``Network``): the tests use
``trolley-h*`` on ``trolley-br0`` (10.247.13.0/24), the bench ``trolley-bh*`` on ``trolley-bbr0`` (10.247.14.0/24),
so that a bench and a test run on one machine never remove each other's hosts. Everything is removed by name
(namespaces, bridge, nftables table) or PID (processes), also before starting, in case an earlier run was killed before
its teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

COUNTER_TABLE = "trolley_count"
"""The nftables table (``inet`` family) that counts what reaches a port of a host; it lives in the host's namespace."""


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, or the kernel refused)."""


class NftUnavailable(RuntimeError):
    """nftables is not installed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Host:
    """One namespace "host"."""

    name: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host."""
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        """Every process in the namespace (``ip netns pids``)."""
        return [int(pid) for pid in ip("netns", "pids", self.name).stdout.split()]

    def count_tcp_to(self, port: int) -> None:
        """Count, in this host's own firewall, the TCP connections opened to ``port`` (SYN without ACK) and every byte
        that arrives at it; read with :meth:`tcp_counts`, removed with :meth:`stop_counting` (or the namespace)."""
        if shutil.which("nft") is None:
            raise NftUnavailable("nftables is not installed (apt-get install -y nftables)")
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
        command = [*self.prefix, "nft", *args]
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


@dataclass(frozen=True)
class Network:
    """The names and addresses one user of namespace hosts owns: host ``i`` is ``{host_prefix}{i}`` at
    ``{subnet}.{10 + i}``, joined by ``{veth_prefix}{i}`` to ``bridge`` at ``{subnet}.1``."""

    host_prefix: str
    bridge: str
    veth_prefix: str
    subnet: str

    @property
    def server(self) -> str:
        return f"{self.subnet}.1"

    def host(self, index: int) -> Host:
        return Host(f"{self.host_prefix}{index}", f"{self.subnet}.{10 + index}")

    def remove(self, names: list[str]) -> None:
        """Kill the processes of these hosts, delete them (their veths go with them) and the bridge, by name."""
        for name in names:
            if name.startswith(self.host_prefix):
                for pid in ip("netns", "pids", name, check=False).stdout.split():
                    with suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                ip("netns", "del", name, check=False)  # takes its end of the veth, and so the pair, with it
        ip("link", "del", self.bridge, check=False)


TESTS = Network("trolley-h", "trolley-br0", "trolley-v", "10.247.13")
BENCH = Network("trolley-bh", "trolley-bbr0", "trolley-bv", "10.247.14")


def check_possible() -> None:
    """HostsUnavailable with the reason when this process cannot make namespaces."""
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None:
        raise HostsUnavailable("iproute2 is not installed (apt-get install -y iproute2)")


@contextmanager
def namespace_hosts(network: Network, count: int) -> Iterator[list[Host]]:
    """``count`` hosts on ``network`` for the life of the block; their processes and names are removed at the end."""
    check_possible()
    made = [network.host(i) for i in range(1, count + 1)]
    network.remove([host.name for host in made])
    try:
        ip("link", "add", network.bridge, "type", "bridge")
        ip("addr", "add", f"{network.server}/24", "dev", network.bridge)
        ip("link", "set", network.bridge, "up")
        for index, host in enumerate(made, start=1):
            outside = f"{network.veth_prefix}{index}"
            ip("netns", "add", host.name)
            ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("link", "set", outside, "master", network.bridge, "up")
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.name, "link", "set", "eth0", "up")
            ip("-n", host.name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        network.remove([host.name for host in made])
        raise HostsUnavailable(f"could not make network namespaces: {exc.stderr.strip()}") from exc
    try:
        yield made
    finally:
        for host in made:
            for process in host.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
        network.remove([host.name for host in made])
