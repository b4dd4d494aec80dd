"""Fixtures of the engine tests: real ``celery worker`` processes on the test Redis, a configuration file naming
the test Orthanc under several profiles (one per protocol, plus profiles behind a local fault/counting proxy)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from testbed.processes import stop
from tests.engine.proxy import PacsProxy
from trolley_tasks.engine import api
from trolley_tasks.engine.models import JobStatus
from trolley_tasks.engine.settings import Settings, load_settings

FAST_RETRY = """
[sources.{name}.retry.server-error]
base_delay = 0.2
max_delay = 0.5
[sources.{name}.retry.server-busy]
base_delay = 0.2
max_delay = 3
[sources.{name}.retry.payload-invalid]
base_delay = 0.2
max_delay = 0.5
[sources.{name}.retry.transient]
base_delay = 0.2
max_delay = 0.5
"""


def _window_excluding_now() -> str:
    start = datetime.now() + timedelta(hours=3)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def write_config(path: Path, broker_url: str, orthanc: Any, proxy: PacsProxy, state_dir: Path) -> Path:
    """One profile per protocol on the session Orthanc, and ``proxied``/``throttled``/``closed`` through the proxy."""
    web, wado, port = orthanc.dicomweb_url, orthanc.wado_url, orthanc.dicom_port
    dimse = f'host = "127.0.0.1"\nport = {port}\ncalled_aet = "ORTHANC"\ncalling_aet = "TROLLEY"\n'
    text = f"""
state_dir = "{state_dir}"
[broker]
url = "{broker_url}"
[engine]
sweep_interval = 0.5
[sources.wado-rs]
url = "{web}"
[sources.wado-uri]
downloader = "wado-uri"
url = "{web}"
wado_uri_url = "{wado}"
[sources.c-get]
searcher = "dicom-qr"
downloader = "c-get"
{dimse}
[sources.c-move]
searcher = "dicom-qr"
downloader = "c-move"
{dimse}move_destination = "{orthanc.move_aet}"
receiver_host = "127.0.0.1"
receiver_port = {orthanc.move_port}
[sources.proxied]
downloader = "wado-uri"
url = "{proxy.url}/dicom-web"
wado_uri_url = "{proxy.url}/wado"
max_concurrency = 8
[sources.proxied-rs]
url = "{proxy.url}/dicom-web"
max_concurrency = 8
[sources.throttled]
downloader = "wado-uri"
url = "{proxy.url}/dicom-web"
wado_uri_url = "{proxy.url}/wado"
max_concurrency = 2
[sources.closed]
url = "{proxy.url}/dicom-web"
window = "{_window_excluding_now()}"
"""
    text += FAST_RETRY.format(name="proxied") + FAST_RETRY.format(name="proxied-rs")
    path.write_text(text)
    return path


@dataclass
class Workers:
    """One ``celery worker`` (prefork, N processes) on the test broker."""

    process: subprocess.Popen[bytes]
    log: Path
    children: list[psutil.Process] = field(default_factory=list)

    def pool(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()


@contextmanager
def celery_workers(
    config: Path,
    concurrency: int,
    log_dir: Path,
    loglevel: str = "info",
    environment: Mapping[str, str | None] | None = None,
) -> Iterator[Workers]:
    """Start a real worker: ``python -m celery -A trolley_tasks.engine.celery_app.app worker -c N -P prefork``.

    ``environment`` adds variables to the worker's environment (None: removes one), for a host that differs from
    the producer's (a secret missing, other engine clocks)."""
    name = f"t{uuid.uuid4().hex[:6]}"
    log = log_dir / f"worker-{name}.log"
    env = dict(os.environ, TROLLEY_CONFIG=str(config), PYTHONPATH=os.getcwd())
    env.pop("TROLLEY_BROKER__URL", None)
    for key, value in (environment or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    command = [
        sys.executable, "-m", "celery", "-A", "trolley_tasks.engine.celery_app.app", "worker",
        "-c", str(concurrency), "-P", "prefork", "-n", f"{name}@%h", "-l", loglevel,
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    workers = Workers(process, log)
    deadline = time.monotonic() + 60
    while b"ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"celery worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield workers
    finally:
        stop(process, timeout=30, group=True)


@dataclass
class EngineEnv:
    settings: Settings
    config: Path
    proxy: PacsProxy
    tmp: Path

    @functools.cached_property
    def engine(self) -> api.EngineClient:
        """The one engine client of this environment (closed by the fixture)."""
        return api.EngineClient(self.settings)

    def wait(self, job: str, until: Callable[[JobStatus], bool] | None = None, timeout: float = 120) -> JobStatus:
        """Poll the job until it ended (or ``until`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.engine.status(job)
            if (until or (lambda s: s.state.ended))(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} did not get there in {timeout}s: {status}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def engine_env(orthanc, redis_service, tmp_path_factory) -> Iterator[EngineEnv]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("engine")
    proxy = PacsProxy(orthanc.url).start()
    config = write_config(tmp / "trolley.toml", redis_service.broker_url, orthanc, proxy, tmp / "state")
    settings = load_settings(config)
    env = EngineEnv(settings, config, proxy, tmp)
    yield env
    env.engine.close()
    proxy.stop()


@pytest.fixture(scope="module")
def workers(engine_env: EngineEnv) -> Iterator[Workers]:
    """Two worker processes for the module's tests."""
    with celery_workers(engine_env.config, 2, engine_env.tmp) as running:
        yield running


@pytest.fixture
def fresh(redis_service, engine_env: EngineEnv) -> EngineEnv:  # type: ignore[no-untyped-def]
    """No ledger, throttle state or queued message left by another test, and a proxy without faults.

    Not ``redis_db``: FLUSHDB would also drop kombu's queue bindings, which running workers and producers declared
    once and cached, and messages would then be routed nowhere."""
    client = redis_service.client()
    for key in client.scan_iter("trolley:*", count=1000):
        client.delete(key)
    client.delete("trolley.fetch", "trolley.expand")
    engine_env.proxy.faults.clear()
    engine_env.proxy.delay = 0.0
    engine_env.proxy.max_in_flight = 0
    engine_env.proxy.requests.clear()
    return engine_env


@contextmanager
def cli_service(
    args: list[str], config: Path, log: Path, ready_url: str, extra_env: Mapping[str, str | None] | None = None
) -> Iterator[None]:
    """``trolley-tasks ARGS`` (Flower, metrics) with ``config``; returns once ``ready_url`` answers. Stopped by PID
    (SIGINT, then SIGKILL). ``extra_env`` sets variables for it; a None value removes one."""
    env = dict(os.environ, TROLLEY_CONFIG=str(config))
    env.pop("TROLLEY_BROKER__URL", None)
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "trolley_tasks.cli", *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(ready_url, timeout=2)
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"trolley-tasks {args[0]} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield
    finally:
        stop(process, signal.SIGINT, timeout=15)
