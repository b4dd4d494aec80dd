"""The Celery tasks: a few lines each, the logic is in plain functions (fetch_batch, expand_row).

:func:`register_tasks` puts them on an app made by :func:`~trolley_tasks.engine.celery_app.app.make_app`. Each worker
process builds one :class:`~trolley_tasks.engine.context.EngineContext` lazily, after the fork, from the settings the
app carries, and keeps it (sessions, associations, throttle scripts) for every task it runs. The main process of a
worker starts the host's C-MOVE receivers when the worker is ready.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from trolley_tasks.engine.celery_app.messages import EXPAND, FETCH, CeleryPublisher
from trolley_tasks.engine.context import EngineContext, FetchMessage, build_context
from trolley_tasks.engine.expand import expand_row
from trolley_tasks.engine.fetch import fetch_batch
from trolley_tasks.engine.receiver import start_host_receivers
from trolley_tasks.engine.settings import Settings
from trolley_tasks.transports.storage_scp import StorageReceiver

log = logging.getLogger("trolley.engine.tasks")

_context: EngineContext | None = None
_receivers: list[StorageReceiver] = []


def context(app: Celery) -> EngineContext:
    """This process's engine context, built on first use from the app's settings."""
    global _context
    if _context is None:
        settings: Settings = app.trolley_settings
        _context = build_context(settings, CeleryPublisher(app))
    return _context


@worker_process_init.connect
def _new_process(**_: Any) -> None:
    global _context
    _context = None  # never share the parent's sockets with a forked child


@worker_process_shutdown.connect
def _process_ends(**_: Any) -> None:
    if _context is not None:
        _context.close()


@worker_ready.connect
def _start_receivers(sender: Any = None, **_: Any) -> None:
    settings = getattr(getattr(sender, "app", None), "trolley_settings", None)
    if settings is not None:
        _receivers.extend(start_host_receivers(settings))


@worker_shutdown.connect
def _stop_receivers(**_: Any) -> None:
    while _receivers:
        _receivers.pop().stop()


def register_tasks(app: Celery) -> None:
    """Register ``trolley.fetch`` and ``trolley.expand_study`` on ``app``."""

    @app.task(name=FETCH, bind=True)
    def fetch(self: Task, job: str, source: str, study: str, series: str, instances: list[str]) -> None:
        """Fetch a batch of instances of one series (see trolley_tasks.engine.fetch)."""
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        message = FetchMessage(job, source, study, series, tuple(instances))
        result = fetch_batch(context(self.app), message, redelivered=redelivered)
        log.info("fetch %s series %s: %s", job, series, result)

    @app.task(name=EXPAND, bind=True)
    def expand_study(self: Task, job: str, source: str, row: str, attempt: int = 1) -> None:
        """Expand one cohort row into instances and fetch messages (see trolley_tasks.engine.expand)."""
        result = expand_row(context(self.app), job, source, row, attempt)
        log.info("expand %s %s: %s", job, row[:120], result)
