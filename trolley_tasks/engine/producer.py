"""The producer: a cohort becomes a job in the ledger and one expansion message per row. Memory stays flat.

Everything is checked before the first message goes out: the source profile exists on this machine and its
secrets are present, the layout is a valid template, and every cohort row is valid (a CSV is read twice, streamed:
once to validate, once to queue). A bad row refuses the job with a :class:`~trolley_tasks.cohort.CohortError`
naming the row and the column, unless ``skip_bad_rows`` records it in the job instead.

Re-running an export (same cohort, source, output and layout) gives the same job id, and the job resumes: paused or
ended, it becomes active again, its failed instances get a fresh budget, and every row is expanded again (finding
instances the server gained meanwhile), while what is done stays done. ``new_job=True`` starts a separate job that
counts valid files already on disk as done without fetching them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from trolley_tasks.cohort import (
    CohortError,
    CohortRow,
    iter_csv_rows,
    row_from_query,
    rows_from_references,
    validate_csv,
)
from trolley_tasks.core import InstanceReference, Query, SeriesReference, StudyReference
from trolley_tasks.engine.context import EngineContext, storage_for_layout
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.report import finalize_job
from trolley_tasks.errors import ConfigurationError

Cohort = str | Path | Query | Iterable[StudyReference | SeriesReference | InstanceReference]
"""A cohort CSV path, a Query, or references."""

DEFAULT_BATCH_SIZE = 50
CANCEL_CHECK_EVERY = 500


def _row_source(cohort: Cohort, skip_bad_rows: bool) -> tuple[Callable[[], Iterator[CohortRow | CohortError]], str]:
    """A re-startable iterator over the cohort's rows, and a description for the job record."""
    if isinstance(cohort, str | Path):
        path = Path(cohort)
        validate_csv(path, skip_bad_rows=skip_bad_rows)  # raises on the first bad row unless skipping
        return (lambda: iter_csv_rows(path, skip_bad_rows=skip_bad_rows)), f"csv:{path.resolve()}"
    if isinstance(cohort, Query):
        row = row_from_query(cohort)
        return (lambda: iter([row])), f"query:{cohort.to_short_string()}"
    rows = rows_from_references(list(cohort))
    if not rows:
        raise CohortError("the cohort is empty: no references given")
    return (lambda: iter(rows)), f"references:{len(rows)} rows"


def default_job_id(rows: Iterable[CohortRow | CohortError], source: str, output: str, layout: str) -> str:
    """Same cohort, source, output and layout -> same job id. Streams the rows."""
    digest = hashlib.sha256(f"{source}\n{output}\n{layout}\n".encode())
    for row in rows:
        digest.update((row.key() if isinstance(row, CohortRow) else f"bad:{row}").encode())
        digest.update(b"\n")
    return "t" + digest.hexdigest()[:15]


def submit(
    ctx: EngineContext,
    cohort: Cohort,
    *,
    source: str,
    output: str | Path,
    layout: str = "study-series",
    batch_size: int = DEFAULT_BATCH_SIZE,
    job_id: str | None = None,
    new_job: bool = False,
    skip_bad_rows: bool = False,
) -> str:
    """Validate, create (or reopen) the job, queue one expansion per row. Returns the job id."""
    if batch_size < 1:
        raise ConfigurationError(f"batch size must be at least 1, got {batch_size}")
    ctx.settings.source(source)  # unknown profile, missing secret: refused before anything is queued
    storage_for_layout(layout)  # a bad template: refused too
    out = os.path.abspath(output)
    rows, description = _row_source(cohort, skip_bad_rows)
    if job_id is None:
        job_id = default_job_id(rows(), source, out, layout)
        if new_job:
            job_id = f"{job_id}-{secrets.token_hex(3)}"
    elif not job_id.replace("-", "").replace("_", "").isalnum() or len(job_id) > 64:
        raise ConfigurationError(f"job id {job_id!r}: letters, digits, '-' and '_' only, at most 64 characters")
    ledger = ctx.ledger
    fields = {"source": source, "output": out, "layout": layout, "batch_size": batch_size, "cohort": description}
    if not ledger.create_job(job_id, fields):
        existing = ledger.job_fields(job_id)
        for key in ("source", "output", "layout"):
            if existing.get(key) != str(fields[key]):
                raise ConfigurationError(
                    f"job {job_id} exists with {key} {existing.get(key)!r}, not {fields[key]!r}; "
                    "choose another job id or the same settings"
                )
        ledger.reopen(job_id, JobState.EXPANDING)
        ledger.r.delete(ledger.key(job_id, "badrows"))
        ledger.r.hset(ledger.key(job_id, "job"), "bad_rows", 0)
        for _, series, uids in ledger.failed(job_id):
            ledger.unfail(job_id, series, uids)
    queued = 0
    for row in rows():
        if isinstance(row, CohortError):
            ledger.record_bad_row(job_id, str(row))
            continue
        key = row.key()
        ledger.add_row(job_id, key)
        ctx.publisher.expand(job_id, source, key)
        queued += 1
        if queued % CANCEL_CHECK_EVERY == 0 and ledger.state(job_id) == JobState.CANCELLED.value:
            break  # cancel stops queueing
    if ledger.producer_done(job_id):
        finalize_job(ledger, job_id)
    return job_id
