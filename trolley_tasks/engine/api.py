"""The engine's public API: what the CLI (and a notebook) calls. Every function takes the :class:`Settings`.

How the engine finds its broker and ledger: ``settings.broker.url`` (``[broker] url`` or ``TROLLEY_BROKER__URL``) is
the Celery broker, Redis or RabbitMQ; the ledger is ``settings.broker.ledger_url`` (``TROLLEY_BROKER__LEDGER_URL``),
defaulting to the broker's URL when that is a Redis. Workers read the same two settings from their environment
(:mod:`trolley_tasks.engine.celery_app.celeryconfig`).

>>> job = submit_export("cohort.csv", source="orthanc", output="/data/out", settings=settings)
>>> job_status(job, settings).state        # expanding, running, paused, done, done-with-failures, cancelled
>>> pause(job, settings); resume(job, settings); retry_failed(job, settings); cancel(job, settings)

When a job ends, the engine writes ``<output>/trolley-report.json`` and ``.csv`` (:func:`write_report` rewrites
them on demand).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

from celery import Celery

from trolley_tasks.config import Settings
from trolley_tasks.engine import control, producer, report
from trolley_tasks.engine.celery_app.celeryconfig import DEFAULT_BROKER, celery_settings
from trolley_tasks.engine.celery_app.messages import CeleryPublisher
from trolley_tasks.engine.context import EngineContext, build_context
from trolley_tasks.engine.models import Failure, InstanceRecord, JobState, JobStatus, SeriesProgress
from trolley_tasks.engine.producer import DEFAULT_BATCH_SIZE, Cohort
from trolley_tasks.errors import UsageError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Cohort",
    "Failure",
    "InstanceRecord",
    "JobNotFoundError",
    "JobState",
    "JobStatus",
    "SeriesProgress",
    "bad_rows",
    "cancel",
    "job_failures",
    "job_instances",
    "job_status",
    "list_jobs",
    "pause",
    "resume",
    "retry_failed",
    "series_progress",
    "submit_export",
    "write_report",
]


class JobNotFoundError(UsageError):
    """No job with this id in the ledger (never submitted, or its record expired)."""


@cache
def _publisher_app(broker_url: str) -> Celery:
    app = Celery("trolley_tasks", set_as_current=False)
    app.conf.update(celery_settings(broker_url))
    return app


_contexts: dict[str, EngineContext] = {}


def engine_context(settings: Settings) -> EngineContext:
    """A producer-side context for ``settings`` (cached per configuration): the ledger, and a publisher on the
    configured broker."""
    key = settings.model_dump_json()
    if key not in _contexts:
        broker = settings.broker.url or DEFAULT_BROKER
        _contexts[key] = build_context(settings, CeleryPublisher(_publisher_app(broker)), broker)
    return _contexts[key]


def _known(ctx: EngineContext, job_id: str) -> None:
    if not ctx.ledger.exists(job_id):
        raise JobNotFoundError(f"no job {job_id!r} (never submitted, or expired)")


def submit_export(
    cohort: Cohort,
    *,
    source: str,
    output: str | Path,
    settings: Settings,
    layout: str = "study-series",
    batch_size: int = DEFAULT_BATCH_SIZE,
    job_id: str | None = None,
    new_job: bool = False,
    skip_bad_rows: bool = False,
) -> str:
    """Validate the cohort and queue the export; return the job id (workers do the rest).

    Parameters
    ----------
    cohort
        A CSV path (see :mod:`trolley_tasks.cohort` for the columns), a :class:`~trolley_tasks.core.Query`,
        or an iterable of Study/Series/InstanceReference.
    source
        The profile name in ``[sources.NAME]``; workers resolve it in their own configuration.
    output
        The output directory, which every worker must see at the same path.
    layout
        ``study-series`` (default), ``flat``, or a template like ``{PatientID}/{SOPInstanceUID}.dcm``.
    batch_size
        Instances of one series per fetch message.
    job_id
        Default: derived from cohort, source, output and layout, so re-running the same export resumes its job.
    new_job
        Start a separate job even if the same export ran before; valid files already on disk count as done
        without a fetch.
    skip_bad_rows
        Record bad cohort rows in the job (:func:`bad_rows`, the report) instead of refusing the job.

    Raises
    ------
    CohortError
        A bad row (names the file, row and column); nothing was queued.
    ConfigurationError
        Unknown source, missing secret, bad layout, or a job id taken by another export.
    """
    ctx = engine_context(settings)
    return producer.submit(
        ctx,
        cohort,
        source=source,
        output=output,
        layout=layout,
        batch_size=batch_size,
        job_id=job_id,
        new_job=new_job,
        skip_bad_rows=skip_bad_rows,
    )


def job_status(job_id: str, settings: Settings) -> JobStatus:
    """Counts, state, timestamps, rate, ETA and failures by class. JobNotFoundError for an unknown id."""
    status = engine_context(settings).ledger.status(job_id)
    if status is None:
        raise JobNotFoundError(f"no job {job_id!r} (never submitted, or expired)")
    return status


def list_jobs(settings: Settings) -> list[JobStatus]:
    """Every job the ledger knows, oldest first."""
    ledger = engine_context(settings).ledger
    return [status for job_id in ledger.job_ids() if (status := ledger.status(job_id)) is not None]


def pause(job_id: str, settings: Settings, reason: str = "paused by the user") -> bool:
    """Pause an active job (running batches finish; nothing new starts). False if it was not active."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return control.pause(ctx, job_id, reason)


def resume(job_id: str, settings: Settings) -> bool:
    """Resume a paused job and queue what is pending. False if it was not paused."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return control.resume(ctx, job_id)


def cancel(job_id: str, settings: Settings) -> bool:
    """Cancel: stop queueing, drop pending work, keep what is done, write the report. False if it had ended."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return control.cancel(ctx, job_id)


def retry_failed(job_id: str, settings: Settings) -> int:
    """Queue failed instances and failed rows again with a fresh budget; return how many."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return control.retry_failed(ctx, job_id)


def job_failures(job_id: str, settings: Settings) -> Iterator[Failure]:
    """Why each failed row and instance failed (rows first). Streams."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return ctx.ledger.failures(job_id)


def series_progress(job_id: str, settings: Settings) -> Iterator[SeriesProgress]:
    """Expected, done and failed per series: the completeness check. Streams."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return ctx.ledger.series_progress(job_id)


def job_instances(job_id: str, settings: Settings) -> Iterator[InstanceRecord]:
    """Every instance of the job with its state, attempts, size and error. Streams."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return ctx.ledger.instances(job_id)


def bad_rows(job_id: str, settings: Settings) -> list[str]:
    """The cohort rows left out by ``skip_bad_rows``, each as its error line (file, row, column, reason)."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return ctx.ledger.bad_rows(job_id)


def write_report(job_id: str, settings: Settings) -> tuple[Path, Path]:
    """(Re)write ``<output>/trolley-report.json`` and ``.csv``; return their paths."""
    ctx = engine_context(settings)
    _known(ctx, job_id)
    return report.write_report(ctx.ledger, job_id)
