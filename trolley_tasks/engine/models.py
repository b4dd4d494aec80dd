"""What the engine tells its callers (the CLI, the report, a notebook): pydantic models, no Redis types."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from trolley_tasks.errors import ErrorClass, TrolleyError, error_class_of


class JobState(StrEnum):
    """The life of a job (DESIGN.md, "The engine").

    ``expanding`` while cohort rows are still being turned into instances (fetches already run), ``running`` once
    every row is expanded, ``paused`` by a user or by an auth error, then one of the three end states.
    """

    EXPANDING = "expanding"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    DONE_WITH_FAILURES = "done-with-failures"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.DONE_WITH_FAILURES, JobState.CANCELLED)


class InstanceState(StrEnum):
    """The state of one instance in the ledger."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    EXCLUDED = "excluded"
    """Left out by the export's de-identification profile once its header was seen (no longer expected)."""


STATE_CODES: dict[str, InstanceState] = {
    "p": InstanceState.PENDING,
    "r": InstanceState.RUNNING,
    "d": InstanceState.DONE,
    "s": InstanceState.SKIPPED,
    "f": InstanceState.FAILED,
    "e": InstanceState.EXCLUDED,
}


def from_epoch(value: str | float | None) -> datetime | None:
    """A ledger timestamp (seconds since the epoch, Redis clock) as an aware UTC datetime, or None."""
    if value in (None, ""):
        return None
    return datetime.fromtimestamp(float(value), tz=UTC)


class Failure(BaseModel):
    """Why one instance (or one cohort row that could not be expanded) failed."""

    model_config = ConfigDict(frozen=True)

    study_uid: str = ""
    series_uid: str = ""
    instance_uid: str = ""
    row: str = ""
    """For a cohort row whose expansion failed: the row as the cohort gave it (``row 12: AccessionNumber=A1``)."""
    error_class: str
    error: str
    """The exception's class name, for example ``NotFoundError``."""
    message: str
    attempts: int = 0

    @classmethod
    def of(cls, error: BaseException, attempts: int, **where: str) -> Failure:
        """The record of ``error`` after ``attempts`` tries; ``where`` names the study/series/instance UIDs or the
        row. Messages of our errors carry no secrets (``transports.http.redact_url``); an exception outside the
        error tree is a bug, recorded as request-rejected with its type so that a person can find it."""
        error_class = error_class_of(error)
        return cls(
            error_class=error_class.value if error_class else ErrorClass.REQUEST_REJECTED.value,
            error=type(error).__name__,
            message=error.message if isinstance(error, TrolleyError) else f"{type(error).__name__}: {error}",
            attempts=attempts,
            **where,
        )


class Exclusion(BaseModel):
    """A series (or, with ``instance_uid``, one instance) a job left out on purpose, and the rule that did (a series
    filter, or de-identification)."""

    study_uid: str
    series_uid: str
    rule: str
    instances: int
    instance_uid: str = ""

    def field(self) -> str:
        """Its field in the ledger's ``excluded`` hash: one per series, or per instance for an instance."""
        return f"{self.series_uid}/{self.instance_uid}" if self.instance_uid else self.series_uid


class JobStatus(BaseModel):
    """A job's counters and state, as :meth:`trolley_tasks.engine.api.EngineClient.status` returns them.

    ``done`` counts every instance verified on disk; ``skipped`` is the part of ``done`` that was already on disk
    and valid, so it was not fetched. The job is complete when ``done + failed == expected`` and every row is
    expanded; ``missing`` is what is neither done nor failed.
    """

    job_id: str
    state: JobState
    source: str
    output: str
    layout: str
    expected: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    rows: int = 0
    rows_expanded: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    """Bad cohort rows left out with ``skip_bad_rows``; listed by ``EngineClient.bad_rows``."""
    created_at: datetime | None = None
    started_at: datetime | None = None
    """When a fetch first claimed an instance of the job (None until then)."""
    finished_at: datetime | None = None
    pause_reason: str = ""
    rate: float = 0.0
    """Instances fetched per second while the job was not paused."""
    byte_rate: float = 0.0
    eta_seconds: float | None = None
    failures_by_class: dict[str, int] = {}
    excluded: list[Exclusion] = []
    """Every series (or instance) left out by the job's series filter or de-identification profile, with the rule
    that excluded it (never expected)."""
    reported_at: datetime | None = None
    """When the engine wrote ``trolley-report.json``/``.csv`` for the job's end (None: not yet). The state turns
    ``done`` a moment before the report is on disk; wait for this before reading it."""

    @property
    def missing(self) -> int:
        return max(0, self.expected - self.done - self.failed)

    @property
    def complete(self) -> bool:
        """Every expected instance is on disk and verified, and no row failed."""
        return self.state is JobState.DONE and self.done == self.expected


class SeriesProgress(BaseModel):
    """Completeness of one series: expected against done and failed (issue 5, "Completeness")."""

    study_uid: str
    series_uid: str
    expected: int
    done: int
    failed: int

    @property
    def complete(self) -> bool:
        return self.done == self.expected


class InstanceRecord(BaseModel):
    """One instance as the ledger and the report know it."""

    study_uid: str
    series_uid: str
    instance_uid: str
    state: InstanceState
    attempts: int
    redeliveries: int
    size: int
    path: str
    """Relative to the job's output directory; empty until stored."""
    error_class: str = ""
    message: str = ""


def status_from_fields(
    job_id: str, f: dict[str, str], by_class: dict[str, int], now: float, excluded: list[Exclusion] | None = None
) -> JobStatus:
    """A :class:`JobStatus` from the job hash; rate and ETA over the time the job was not paused."""

    def n(name: str) -> int:
        return int(float(f.get(name) or 0))

    state = JobState(f["state"])
    created = float(f.get("created_at") or now)
    end = float(f["finished_at"]) if f.get("finished_at") else now
    if state is JobState.PAUSED and f.get("paused_at"):
        end = float(f["paused_at"])
    active = max(1e-6, end - created - float(f.get("paused_seconds") or 0))
    fetched = n("done") - n("skipped")
    rate = fetched / active
    remaining = max(0, n("expected") - n("done") - n("failed"))
    eta = remaining / rate if rate > 0 and not state.ended else None
    return JobStatus(
        job_id=job_id,
        state=state,
        source=f.get("source", ""),
        output=f.get("output", ""),
        layout=f.get("layout", ""),
        expected=n("expected"),
        done=n("done"),
        failed=n("failed"),
        skipped=n("skipped"),
        bytes=n("bytes"),
        rows=n("rows"),
        rows_expanded=n("expanded"),
        rows_failed=n("failed_rows"),
        rows_skipped=n("bad_rows"),
        created_at=from_epoch(f.get("created_at")),
        started_at=from_epoch(f.get("started_at")),
        finished_at=from_epoch(f.get("finished_at")),
        pause_reason=f.get("pause_reason", ""),
        rate=rate,
        byte_rate=n("bytes") / active,
        eta_seconds=eta,
        failures_by_class=by_class,
        excluded=excluded or [],
        reported_at=from_epoch(f.get("reported_at")),
    )


class SourceHealth(BaseModel):
    """How one source profile is doing right now, as every worker on every host sees it through the ledger Redis.

    ``effective_concurrency`` is the throttle's AIMD limit (``max_concurrency`` halved by server-busy answers and
    grown back by clean fetches); ``slots_in_use`` counts live leases of its semaphore; ``breaker`` is ``closed``,
    ``open`` or ``half-open`` (:meth:`~trolley_tasks.engine.breaker.Breaker.state`).
    """

    name: str
    max_concurrency: int
    effective_concurrency: int
    slots_in_use: int
    breaker: str
    waits: dict[str, float] = {}
    """Throttle waits so far: ``slot`` and ``rate`` (how many), ``slot_seconds`` and ``rate_seconds`` (how long)."""


class WorkerInfo(BaseModel):
    """One live Celery worker (a node: one main process and its pool), as its control replies describe it."""

    name: str
    """The node name, ``name@host``."""
    host: str
    pid: int
    processes: int
    """Pool processes (``-c``)."""
    queues: list[str]
    active: list[str]
    """What it holds right now, one readable line per task (task name, job, series, instance count)."""
