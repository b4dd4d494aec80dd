"""A PACS "10 ms away": a TCP relay that holds every chunk ``delay`` seconds in each direction (5 ms: a 10 ms round
trip). This kernel has no ``netem``, so the bench carries this instead.

It is a delay, not a throttle: each chunk is stamped as it is read and leaves ``delay`` after that, whatever queued
behind it, so a stream keeps its bandwidth and pays the latency once per round trip. A new connection pays the
handshake a real network would (SYN and SYN-ACK: one round trip) before the client's first bytes move on.

Runs in its own process, so that its CPU is nobody's (not the reference client's, not the engine's)::

    python -m bench.relay --listen 127.0.0.1:0 --target 127.0.0.1:8042 --delay 0.005

and prints ``ready HOST PORT`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from testbed.processes import stop

CHUNK = 256 * 1024
QUEUED_BYTES = 16 * 1024 * 1024
"""Bytes one direction may hold in flight: a window far above 10 ms of loopback traffic, so it never throttles."""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    held = 0  # bytes read and not yet written
    room = asyncio.Event()
    room.set()

    async def send() -> None:
        nonlocal held
        try:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()
                held -= len(chunk)
                if held < QUEUED_BYTES:
                    room.set()
        except (ConnectionError, OSError):
            room.set()
            return

    sender = asyncio.create_task(send())
    try:
        while not sender.done():
            await room.wait()
            chunk = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, chunk))
            if not chunk:
                break
            held += len(chunk)
            if held >= QUEUED_BYTES:
                room.clear()
    except (ConnectionError, OSError):
        queue.put_nowait((loop.time() + delay, b""))
    await sender


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2 * delay)  # the handshake's round trip
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        for stream in (client_writer, upstream_writer):
            sock = stream.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            _pump(client_reader, upstream_writer, delay),
            _pump(upstream_reader, client_writer, delay),
            return_exceptions=True,
        )
        for stream in (client_writer, upstream_writer):
            stream.close()

    server = await asyncio.start_server(handle, *listen, limit=CHUNK)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"ready {host} {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay", type=float, default=0.005, help="Seconds each chunk is held, in each direction.")
    options = parser.parse_args()
    asyncio.run(_serve(_address(options.listen), _address(options.target), options.delay))


@dataclass
class Relay:
    """A running relay process (``start`` waits for its ``ready`` line; ``stop`` ends it by PID)."""

    target: tuple[str, int]
    delay: float = 0.005
    listen_host: str = "127.0.0.1"

    def start(self) -> Relay:
        command = [
            sys.executable, "-m", "bench.relay", "--listen", f"{self.listen_host}:0",
            "--target", f"{self.target[0]}:{self.target[1]}", "--delay", str(self.delay),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        line = self.process.stdout.readline().split()
        if len(line) != 3 or line[0] != "ready" or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"the relay to {self.target} did not start: {line}")
        self.host, self.port = line[1], int(line[2])
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop(self.process, timeout=10)


if __name__ == "__main__":
    main()
