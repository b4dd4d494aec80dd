"""The CLI's one door into the engine: where the broker is, and the engine API bound to it.

In embedded mode the broker is the private Redis that :mod:`trolley_tasks.embedded` starts; otherwise it is
``[broker] url``. The engine reads its broker from ``TROLLEY_BROKER__URL`` and its profiles from ``TROLLEY_CONFIG``
(the same variables its workers read), so this module sets both before importing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from trolley_tasks.config import Settings
from trolley_tasks.embedded import EmbeddedRedis, embedded_environment, embedded_redis
from trolley_tasks.engine.models import Failure, JobStatus, SeriesProgress


def _point_engine_at(settings: Settings, embedded: EmbeddedRedis | None) -> ModuleType:
    if embedded is not None:
        os.environ.update(embedded_environment(embedded.broker_url, embedded.redis_url))
    config_path = settings.config_path
    if config_path is not None:
        os.environ["TROLLEY_CONFIG"] = str(Path(config_path).resolve())
    from trolley_tasks.engine import api

    return api


@dataclass
class Engine:
    """The engine API for one broker. ``embedded`` holds the embedded Redis when there is one."""

    settings: Settings
    broker_url: str
    embedded: EmbeddedRedis | None = None

    def __post_init__(self) -> None:
        self.api = _point_engine_at(self.settings, self.embedded)

    @property
    def owns_embedded(self) -> bool:
        """True when this command started (and will stop) the embedded Redis: it may run workers on it."""
        return self.embedded is not None and self.embedded.owner

    def submit(self, **kwargs: Any) -> str:
        return str(self.api.submit_export(**kwargs))

    def status(self, job_id: str) -> JobStatus:
        status: JobStatus = self.api.job_status(job_id)
        return status

    def failures(self, job_id: str) -> Iterable[Failure]:
        failures: Iterable[Failure] = self.api.job_failures(job_id)
        return failures

    def series(self, job_id: str) -> Iterable[SeriesProgress]:
        series: Iterable[SeriesProgress] = self.api.series_progress(job_id)
        return series

    def jobs(self) -> list[JobStatus]:
        return list(self.api.list_jobs())

    def pause(self, job_id: str, reason: str) -> None:
        self.api.pause(job_id, reason=reason)

    def resume(self, job_id: str) -> None:
        self.api.resume(job_id)

    def cancel(self, job_id: str) -> None:
        self.api.cancel(job_id)

    def retry_failed(self, job_id: str) -> int:
        return int(self.api.retry_failed(job_id))


@dataclass
class BoundJob:
    """An :class:`Engine` bound to one job: the view the progress display reads."""

    engine: Engine
    job_id: str

    def status(self) -> JobStatus:
        return self.engine.status(self.job_id)

    def failures(self) -> Iterable[Failure]:
        return self.engine.failures(self.job_id)

    def series(self) -> Iterable[SeriesProgress]:
        return self.engine.series(self.job_id)


@contextmanager
def connect(settings: Settings, exclusive: bool) -> Iterator[Engine]:
    """The engine on the configured broker, or on the embedded Redis (started for the block when needed).

    ``exclusive`` is for commands that run workers (export, and resume/retry-failed in embedded mode): they must own
    the embedded state. Read-only commands share the Redis of a running export.
    """
    if settings.broker.url:
        yield Engine(settings, settings.broker.url)
        return
    with embedded_redis(settings.state_dir, exclusive=exclusive) as server:
        yield Engine(settings, server.broker_url, server)
