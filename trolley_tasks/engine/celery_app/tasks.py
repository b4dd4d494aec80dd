"""The Celery tasks: a few lines each, the logic is in plain functions (fetch_batch, expand_row).

:func:`register_tasks` puts them on an app made by :func:`~trolley_tasks.engine.celery_app.app.make_app`. Each worker
process builds one :class:`~trolley_tasks.engine.context.EngineContext` lazily, after the fork, from the settings the
app carries, and keeps it (sessions, associations, throttle scripts) for every task it runs.

The main process of a worker, once ready, runs the watchdog thread (:mod:`~trolley_tasks.engine.watchdog`): every
tick it makes sure this host's C-MOVE receivers run (taking a port over within a tick when the worker that held it
died), and, when it holds the sweep lock, publishes due delayed work and revives stalled jobs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from trolley_tasks.engine.celery_app.publisher import CeleryPublisher
from trolley_tasks.engine.context import EngineContext, build_context
from trolley_tasks.engine.expand import expand_row
from trolley_tasks.engine.fetch import fetch_batch
from trolley_tasks.engine.fleet import broker_queue_lengths
from trolley_tasks.engine.messages import EXPAND, FETCH, FINALIZE, FetchMessage
from trolley_tasks.engine.receiver import HostReceivers
from trolley_tasks.engine.report import finalize_job
from trolley_tasks.engine.settings import Settings
from trolley_tasks.engine.watchdog import Watchdog, WatchdogThread
from trolley_tasks.redaction import ScrubbingFilter, keep_values_out_of_library_logs

log = logging.getLogger("trolley.engine.tasks")

_context: EngineContext | None = None
_watchdog: tuple[WatchdogThread, HostReceivers] | None = None


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


@after_setup_logger.connect
@after_setup_task_logger.connect
def _scrub_worker_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery's own handlers get the same scrubbing as the CLI's: no secret, no query string (patient data), no
    dataset dump reaches a worker's log, whatever library logged it (urllib3 logs request lines at DEBUG). pydicom
    and pynetdicom are told not to log values at all; the pool's processes, forked after this, inherit that."""
    keep_values_out_of_library_logs()
    for handler in logger.handlers if logger is not None else []:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())


@worker_ready.connect
def _start_watchdog(sender: Any = None, **_: Any) -> None:
    global _watchdog
    app = getattr(sender, "app", None)
    settings: Settings | None = getattr(app, "trolley_settings", None)
    if app is None or settings is None:
        return
    receivers = HostReceivers(settings)
    try:
        receivers.ensure()
    except Exception:  # the watchdog must start whatever happens here: it retries the receivers every tick
        log.exception("starting this host's C-MOVE receivers failed; the watchdog tries again every tick")
    ctx = build_context(settings, CeleryPublisher(app))
    watchdog = Watchdog(
        ctx,
        stall_seconds=settings.engine.stall_seconds,
        interval=settings.engine.sweep_interval,
        backlog=lambda: broker_backlog(app),
    )
    _watchdog = (WatchdogThread(watchdog, also=receivers.ensure).start(), receivers)


@worker_shutdown.connect
def _stop_watchdog(**_: Any) -> None:
    global _watchdog
    if _watchdog is not None:
        thread, receivers = _watchdog
        thread.stop()
        receivers.stop()
        _watchdog = None


def broker_backlog(app: Celery) -> int:
    """Messages waiting in the engine's queues (Redis or RabbitMQ: kombu's passive declare counts them)."""
    return sum(broker_queue_lengths(app).values())


def register_tasks(app: Celery) -> None:
    """Register ``trolley.fetch``, ``trolley.expand_study`` and ``trolley.finalize`` on ``app``. A report of a
    million instances takes a while: the finalize task gets four times the usual time limit."""
    limit = int(app.trolley_settings.engine.task_time_limit)

    @app.task(name=FETCH, bind=True)
    def fetch(self: Task, job: str, source: str, study: str, series: str, instances: list[str]) -> None:
        """Fetch a batch of instances of one series (see trolley_tasks.engine.fetch)."""
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        message = FetchMessage(job, source, study, series, tuple(instances))
        ctx = context(self.app)
        result = fetch_batch(ctx, message, redelivered=redelivered)
        log.info("fetch %s series %s: %s", job, ctx.redact(job, series), ctx.redact(job, str(result)))

    @app.task(name=FINALIZE, bind=True, time_limit=4 * limit, soft_time_limit=4 * limit - 60)
    def finalize(self: Task, job: str) -> None:
        """Write an ended job's report and give its keys their expiry (see trolley_tasks.engine.report)."""
        if finalize_job(context(self.app).ledger, job):
            log.info("job %s: report written", job)

    @app.task(name=EXPAND, bind=True)
    def expand_study(self: Task, job: str, source: str, row: str, attempt: int = 1) -> None:
        """Expand one cohort row into instances and fetch messages (see trolley_tasks.engine.expand)."""
        ctx = context(self.app)
        result = expand_row(ctx, job, source, row, attempt)
        log.info("expand %s %s: %s", job, row[:120], ctx.redact(job, str(result)))
