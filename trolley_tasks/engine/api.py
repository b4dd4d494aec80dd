"""The one door into the engine: :class:`EngineClient`, for the CLI, a notebook, or any other caller.

>>> with open_engine(load_settings(), exclusive=False) as engine:
...     job = engine.submit("cohort.csv", source="orthanc", output="/data/out")
...     engine.status(job).state        # expanding, running, paused, done, done-with-failures, cancelled
...     engine.pause(job); engine.resume(job); engine.retry_failed(job); engine.cancel(job)

Where the engine finds its broker and ledger: ``[broker] url`` (``TROLLEY_BROKER__URL``) is the Celery broker, Redis
or RabbitMQ; the ledger is ``[broker] ledger_url``, defaulting to the broker's URL when that is a Redis
(:meth:`~trolley_tasks.engine.settings.BrokerConfig.ledger`). Without a broker, :func:`open_engine` starts the
embedded Redis (:mod:`trolley_tasks.engine.embedded`) and points the client at it. Workers are built from the same
settings (:func:`~trolley_tasks.engine.celery_app.app.make_app`).

Each method is one ledger transition, plus re-queueing where needed:

- **pause**: the job's state says ``paused``; running fetches finish their batch, every message that arrives
  afterwards is dropped without touching the PACS. Nothing is lost: the ledger knows what is pending.
- **resume**: the state goes back to what it was, and everything still pending (and every row not yet expanded) is
  published again. A message that survived the pause finds its instances already claimed and is skipped.
- **cancel**: stop queueing and drop pending work; what is done stays done, and the report is written.
- **retry-failed**: failed instances (and rows whose expansion failed) go back to pending with a fresh budget and
  are queued again; everything else is left alone.

When a job ends, the engine writes ``<output>/trolley-report.json`` and ``.csv`` (:meth:`EngineClient.write_report`
rewrites them on demand).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Unpack

from celery import Celery

from trolley_tasks.engine import fleet, producer, report
from trolley_tasks.engine.celery_app.app import make_app
from trolley_tasks.engine.celery_app.publisher import CeleryPublisher
from trolley_tasks.engine.context import EngineContext, build_context
from trolley_tasks.engine.dispatch import publish_series, republish
from trolley_tasks.engine.embedded import EmbeddedRedis, embedded_redis
from trolley_tasks.engine.models import (
    Failure,
    InstanceRecord,
    JobState,
    JobStatus,
    SeriesProgress,
    SourceHealth,
    WorkerInfo,
)
from trolley_tasks.engine.preview import Preview, preview
from trolley_tasks.engine.producer import DEFAULT_BATCH_SIZE, Cohort, ExportOptions
from trolley_tasks.engine.settings import BrokerConfig, Settings
from trolley_tasks.errors import UsageError
from trolley_tasks.series_filter import SeriesFilter

__all__ = ["DEFAULT_BATCH_SIZE", "Cohort", "EngineClient", "JobNotFoundError", "Preview", "dry_run", "open_engine"]


class JobNotFoundError(UsageError):
    """No job with this id in the ledger (never submitted, or its record expired)."""


class EngineClient:
    """The engine on one broker and ledger: submit an export, read a job's state, control it.

    Parameters
    ----------
    settings
        The configuration (profiles, broker). Workers must see the same profiles under the same names.
    embedded
        The embedded Redis this client runs on, when there is no broker; the client's broker and ledger are then
        that server's.
    """

    def __init__(self, settings: Settings, embedded: EmbeddedRedis | None = None) -> None:
        if embedded is not None:
            broker = BrokerConfig(url=embedded.broker_url, ledger_url=embedded.redis_url)
            settings = settings.model_copy(update={"broker": broker})
        self.settings = settings
        self.embedded = embedded
        self.app: Celery | None = make_app(settings)
        self._ctx = build_context(settings, CeleryPublisher(self.app))
        self.ledger = self._ctx.ledger

    @classmethod
    def over(cls, ctx: EngineContext) -> EngineClient:
        """A client over an existing engine context (its ledger, its publisher): how tests drive the control
        operations without a broker, and how a tool embeds the engine in a process that already has a context."""
        client = cls.__new__(cls)
        client.settings, client.embedded, client.app = ctx.settings, None, None
        client._ctx, client.ledger = ctx, ctx.ledger
        return client

    @property
    def owns_embedded(self) -> bool:
        """True when this client's process started (and will stop) the embedded Redis: it may run workers on it."""
        return self.embedded is not None and self.embedded.owner

    def close(self) -> None:
        """Close the ledger's connections and the app's broker pool."""
        self._ctx.close()
        self.ledger.r.close()
        if self.app is not None:
            self.app.close()

    def _known(self, job_id: str) -> None:
        if not self.ledger.exists(job_id):
            raise JobNotFoundError(f"no job {job_id!r} (never submitted, or expired)")

    # -- submitting ------------------------------------------------------------------------------------------------

    def submit(self, cohort: Cohort, *, source: str, output: str | Path, **options: Unpack[ExportOptions]) -> str:
        """Validate the cohort and queue the export; return the job id (workers do the rest).

        Parameters
        ----------
        cohort
            A CSV path (see :mod:`trolley_tasks.cohort` for the columns), a :class:`~trolley_tasks.core.Query`, or
            an iterable of Study/Series/InstanceReference.
        source
            The profile name in ``[sources.NAME]``; workers resolve it in their own configuration.
        output
            The output directory, which every worker must see at the same path.
        layout (option)
            ``study-series`` (default), ``flat``, or a template like ``{PatientID}/{SOPInstanceUID}.dcm``.
        batch_size (option)
            Instances of one series per fetch message (default 50).
        job_id (option)
            Default: derived from cohort, source, output and layout, so re-running the same export resumes its job.
        new_job (option)
            Start a separate job even if the same export ran before; valid files already on disk count as done
            without a fetch.
        skip_bad_rows (option)
            Record bad cohort rows in the job (:meth:`bad_rows`, the report) instead of refusing the job.
        filters (option)
            A :class:`~trolley_tasks.series_filter.SeriesFilter`: series it excludes are never expected; the status
            and the report list them with the rule. It is kept in the job record, where every worker reads it.
        deid (option)
            A de-identification profile's name (``[deid.NAME]``, or the built-in ``basic``): every file is
            de-identified on its way to disk, under keyed pseudonyms (docs/deid.md). Its key is read here, from the
            variable or file the profile names, and again by each worker from its own environment.
        link_table (option)
            With ``deid``: where to write the original-to-pseudonym table (CSV, mode 0600) when the job ends.

        Raises
        ------
        CohortError
            A bad row (names the file, row and column); nothing was queued.
        ConfigurationError
            Unknown source, missing secret, bad layout, a job id taken by another export, an unknown
            de-identification profile, or its key missing (MissingCredentialError) or too short.
        """
        return producer.submit(self._ctx, cohort, source=source, output=output, **options)

    # -- reading ---------------------------------------------------------------------------------------------------

    def status(self, job_id: str, *, excluded: bool = True) -> JobStatus:
        """Counts, state, timestamps, rate, ETA, failures by class and, unless ``excluded=False`` (what a progress
        poll asks: at 10,000 excluded series the list costs 55 ms a read), what was left out on purpose.
        JobNotFoundError for an unknown id."""
        status = self.ledger.status(job_id, excluded=excluded)
        if status is None:
            raise JobNotFoundError(f"no job {job_id!r} (never submitted, or expired)")
        return status

    def jobs(self) -> list[JobStatus]:
        """Every job the ledger knows, newest first."""
        ids = reversed(self.ledger.job_ids())
        return [status for job_id in ids if (status := self.ledger.status(job_id)) is not None]

    def failures(self, job_id: str) -> Iterator[Failure]:
        """Why each failed row and instance failed (rows first). Streams."""
        self._known(job_id)
        return self.ledger.failures(job_id)

    def series(self, job_id: str) -> Iterator[SeriesProgress]:
        """Expected, done and failed per series: the completeness check. Streams."""
        self._known(job_id)
        return self.ledger.series_progress(job_id)

    def instances(self, job_id: str) -> Iterator[InstanceRecord]:
        """Every instance of the job with its state, attempts, size and error. Streams."""
        self._known(job_id)
        return self.ledger.instances(job_id)

    def bad_rows(self, job_id: str) -> list[str]:
        """The cohort rows left out by ``skip_bad_rows``, each as its error line (file, row, column, reason)."""
        self._known(job_id)
        return self.ledger.bad_rows(job_id)

    def write_report(self, job_id: str) -> tuple[Path, Path]:
        """(Re)write ``<output>/trolley-report.json`` and ``.csv``; return their paths."""
        self._known(job_id)
        return report.write_report(self.ledger, job_id)

    # -- the fleet (read-only: metrics, trolley-tasks workers) ------------------------------------------------------

    def source_health(self) -> list[SourceHealth]:
        """Each configured source's effective concurrency, slots in use and breaker state (no secret needed)."""
        return fleet.source_health(self.ledger.r, self.settings)

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting in ``trolley.fetch`` and ``trolley.expand``, and parked in ``trolley:delayed``."""
        return fleet.queue_lengths(self._celery("queue lengths"), self.ledger.r)

    def workers(self, timeout: float = 2.0) -> list[WorkerInfo]:
        """The workers answering Celery's control broadcast within ``timeout`` seconds (host, pool, queues, tasks)."""
        return fleet.live_workers(self._celery("the worker list"), timeout)

    def _celery(self, what: str) -> Celery:
        if self.app is None:
            raise UsageError(f"{what} needs a broker; this client runs over a bare engine context")
        return self.app

    # -- control ---------------------------------------------------------------------------------------------------

    def pause(self, job_id: str, reason: str = "paused by the user") -> bool:
        """Pause an active job (running batches finish; nothing new starts). False if it was not active."""
        self._known(job_id)
        return self.ledger.pause(job_id, reason)

    def resume(self, job_id: str) -> bool:
        """Resume a paused job and queue what is pending; on a running job, queue what is pending again (a job
        that looks stuck: duplicates are harmless). False when the job had ended."""
        self._known(job_id)
        resumed, finalized = self.ledger.resume(job_id)
        if finalized:
            report.finalize_job(self.ledger, job_id)
            return True
        if resumed or self.ledger.state(job_id) in (JobState.EXPANDING.value, JobState.RUNNING.value):
            republish(self._ctx, job_id)
            return True
        return False

    def cancel(self, job_id: str) -> bool:
        """Cancel: stop queueing, drop pending work, keep what is done, write the report. False if it had ended."""
        self._known(job_id)
        if self.ledger.cancel(job_id):
            report.finalize_job(self.ledger, job_id)
            return True
        return False

    def retry_failed(self, job_id: str) -> int:
        """Queue failed instances and failed rows again with a fresh budget; return how many.

        An ended job becomes ``running`` again; a paused one stays paused (its failed instances become pending and
        go out on resume). It is one step as far as the job's end is concerned: the job cannot finalize while the
        failed instances are being moved, series by series, even with workers settling meanwhile (the ledger's
        ``producer_done`` is held at 0 until the last series moved).
        """
        self._known(job_id)
        ctx, ledger = self._ctx, self.ledger
        meta = ctx.job(job_id)
        status = ledger.status(job_id)
        if meta is None or status is None or (status.failed == 0 and status.rows_failed == 0):
            return 0
        ledger.reopen(job_id, JobState.RUNNING)  # holds the job open (producer_done 0) until the loop is over
        paused = ledger.state(job_id) == JobState.PAUSED.value
        moved = 0
        for row, _ in list(ledger.row_failures(job_id)):
            if ledger.unfail_row(job_id, row):
                moved += 1
                if not paused:
                    ctx.publisher.expand(job_id, meta.source, row)
        for study, series, uids in list(ledger.failed(job_id)):
            again = ledger.unfail(job_id, series, uids)
            moved += len(again)
            if not paused:
                publish_series(ctx, job_id, meta.source, study, series, again, meta.batch_size)
        if ledger.producer_done(job_id):
            report.finalize_job(ledger, job_id)
        return moved


def dry_run(
    settings: Settings,
    cohort: Cohort,
    *,
    source: str,
    filters: SeriesFilter | None = None,
    skip_bad_rows: bool = False,
    deid: str | None = None,
) -> Preview:
    """What :meth:`EngineClient.submit` with the same cohort, source, filter and de-identification profile would take:
    studies, series and instances kept and excluded, and a size estimate, without a broker, a ledger or a queued
    message (:mod:`~trolley_tasks.engine.preview`)."""
    profile = settings.deid_profile(deid) if deid else None
    return preview(settings, cohort, source=source, filters=filters, skip_bad_rows=skip_bad_rows, deid=profile)


@contextmanager
def open_engine(settings: Settings, *, exclusive: bool) -> Iterator[EngineClient]:
    """An :class:`EngineClient` on the configured broker, or on the embedded Redis (started for the block when the
    configuration names no broker).

    ``exclusive`` is for commands that run workers (export, and resume/retry-failed in embedded mode): they must own
    the embedded state. Read-only commands share the Redis of a running export.
    """
    if settings.broker.url:
        client = EngineClient(settings)
        try:
            yield client
        finally:
            client.close()
        return
    with embedded_redis(settings.state_dir, exclusive=exclusive) as server:
        client = EngineClient(settings, server)
        try:
            yield client
        finally:
            client.close()
