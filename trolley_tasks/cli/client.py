"""The CLI's one door into the engine: where the broker is, and the engine API bound to it.

In embedded mode the broker and the ledger are the private Redis that :mod:`trolley_tasks.engine.embedded` starts;
otherwise ``[broker] url`` (and ``ledger_url``). The engine API takes the settings; its workers read the same facts
from ``TROLLEY_BROKER__URL``, ``TROLLEY_BROKER__LEDGER_URL`` and ``TROLLEY_CONFIG``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from trolley_tasks.config import BrokerConfig, Settings
from trolley_tasks.engine.embedded import EmbeddedRedis, embedded_redis
from trolley_tasks.engine.models import Failure, JobStatus, SeriesProgress


def _engine_api(settings: Settings) -> ModuleType:
    """Import the engine API with the environment pointing where ``settings`` point.

    The engine's Celery configuration reads ``TROLLEY_CONFIG`` and ``TROLLEY_BROKER__*`` when it is imported, so a
    ``--config PATH`` given to this command must be in the environment first.
    """
    if settings.config_path is not None:
        os.environ["TROLLEY_CONFIG"] = str(Path(settings.config_path).resolve())
    if settings.broker.url:
        os.environ["TROLLEY_BROKER__URL"] = settings.broker.url
    if settings.broker.ledger_url:
        os.environ["TROLLEY_BROKER__LEDGER_URL"] = settings.broker.ledger_url
    from trolley_tasks.engine import api

    return api


@dataclass
class Engine:
    """The engine API on one broker. ``embedded`` holds the embedded Redis when there is one."""

    settings: Settings
    embedded: EmbeddedRedis | None = None

    def __post_init__(self) -> None:
        if self.embedded is not None:
            broker = BrokerConfig(url=self.embedded.broker_url, ledger_url=self.embedded.redis_url)
            self.settings = self.settings.model_copy(update={"broker": broker})
        self.api = _engine_api(self.settings)

    @property
    def owns_embedded(self) -> bool:
        """True when this command started (and will stop) the embedded Redis: it may run workers on it."""
        return self.embedded is not None and self.embedded.owner

    def submit(self, cohort: Any, **kwargs: Any) -> str:
        return str(self.api.submit_export(cohort, settings=self.settings, **kwargs))

    def status(self, job_id: str) -> JobStatus:
        status: JobStatus = self.api.job_status(job_id, self.settings)
        return status

    def failures(self, job_id: str) -> Iterable[Failure]:
        failures: Iterable[Failure] = self.api.job_failures(job_id, self.settings)
        return failures

    def series(self, job_id: str) -> Iterable[SeriesProgress]:
        series: Iterable[SeriesProgress] = self.api.series_progress(job_id, self.settings)
        return series

    def jobs(self) -> list[JobStatus]:
        """Newest first."""
        return list(reversed(self.api.list_jobs(self.settings)))

    def pause(self, job_id: str, reason: str = "paused by the user") -> bool:
        return bool(self.api.pause(job_id, self.settings, reason=reason))

    def resume(self, job_id: str) -> bool:
        return bool(self.api.resume(job_id, self.settings))

    def cancel(self, job_id: str) -> bool:
        return bool(self.api.cancel(job_id, self.settings))

    def retry_failed(self, job_id: str) -> int:
        return int(self.api.retry_failed(job_id, self.settings))


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
        yield Engine(settings)
        return
    with embedded_redis(settings.state_dir, exclusive=exclusive) as server:
        yield Engine(settings, server)
