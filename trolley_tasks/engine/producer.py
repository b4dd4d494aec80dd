"""The producer: a cohort becomes a job in the ledger and one expansion message per row. Memory stays flat.

Everything is checked before the first message goes out: the source profile exists on this machine and its
secrets are present, the layout is a valid template, and every cohort row is valid. A CSV is read ONCE, streamed:
each row is validated, folded into the job id's digest and staged in the ledger under a temporary key; only when the
whole file was good does the job adopt the staged rows and queue them. A bad row refuses the job with a
:class:`~trolley_tasks.cohort.CohortError` naming the row and the column (the staged rows are dropped, nothing was
queued), unless ``skip_bad_rows`` records it in the job instead.

Re-running an export (same cohort, source, output and layout) gives the same job id, and the job resumes: paused or
ended, it becomes active again, its failed instances get a fresh budget, and every row the job knows is expanded
again -- the cohort's own rows and the studies earlier searches found -- finding instances the server gained
meanwhile, while what is done stays done. ``new_job=True`` starts a separate job that
counts valid files already on disk as done without fetching them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypedDict

from trolley_tasks.cohort import (
    CohortError,
    CohortRow,
    iter_csv_rows,
    row_from_query,
    rows_from_references,
)
from trolley_tasks.core import InstanceReference, Query, SeriesReference, StudyReference
from trolley_tasks.engine.context import EngineContext, storage_for_layout
from trolley_tasks.engine.deidentify import job_fields as deid_job_fields
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.report import finalize_job
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.series_filter import SeriesFilter

Cohort = str | Path | Query | Iterable[StudyReference | SeriesReference | InstanceReference]
"""A cohort CSV path, a Query, or references."""

DEFAULT_BATCH_SIZE = 50


class ExportOptions(TypedDict, total=False):
    """The options of an export besides its cohort, source and output (documented on
    :meth:`~trolley_tasks.engine.api.EngineClient.submit`, which passes them here unchanged)."""

    layout: str
    batch_size: int
    job_id: str | None
    new_job: bool
    skip_bad_rows: bool
    filters: SeriesFilter | None
    deid: str | None
    link_table: Path | None


CANCEL_CHECK_EVERY = 500
STAGE_CHUNK = 500


def cohort_rows(cohort: Cohort, skip_bad_rows: bool) -> tuple[Iterator[CohortRow | CohortError], str]:
    """The cohort's rows (one pass) and a description for the job record."""
    if isinstance(cohort, str | Path):
        path = Path(cohort)
        return iter_csv_rows(path, skip_bad_rows=skip_bad_rows), f"csv:{path.resolve()}"
    if isinstance(cohort, Query):
        # the job record names the search by its fields, never their values (patient data)
        fields = sorted(row_from_query(cohort).query)
        return iter([row_from_query(cohort)]), f"query:{','.join(fields)}"
    rows = rows_from_references(list(cohort))
    if not rows:
        raise CohortError("the cohort is empty: no references given")
    return iter(rows), f"references:{len(rows)} rows"


def _stage(ledger: Ledger, rows: Iterator[CohortRow | CohortError], seed: str) -> tuple[str, str, list[str]]:
    """Read the rows once: stage every good row, digest everything. Returns (staging token, digest, bad rows).

    A :class:`CohortError` raised by the reader (a bad row without ``skip_bad_rows``) drops what was staged.
    """
    token = secrets.token_hex(8)
    digest = hashlib.sha256(seed.encode())
    bad: list[str] = []
    chunk: list[CohortRow] = []
    try:
        for row in rows:
            text = row.key() if isinstance(row, CohortRow) else f"bad:{row}"
            digest.update(text.encode() + b"\n")
            if isinstance(row, CohortError):
                bad.append(str(row))
                continue
            chunk.append(row)
            if len(chunk) >= STAGE_CHUNK:
                ledger.stage_rows(token, chunk)
                chunk = []
        ledger.stage_rows(token, chunk)
    except BaseException:
        ledger.drop_staged_rows(token)
        raise
    return token, "t" + digest.hexdigest()[:15], bad


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
    filters: SeriesFilter | None = None,
    deid: str | None = None,
    link_table: Path | None = None,
) -> str:
    """Validate, create (or reopen) the job, queue one expansion per row. Returns the job id."""
    if batch_size < 1:
        raise ConfigurationError(f"batch size must be at least 1, got {batch_size}")
    ctx.settings.source(source)  # unknown profile, missing secret: refused before anything is queued
    storage_for_layout(layout)  # a bad template: refused too
    if job_id is not None and (not job_id.replace("-", "").replace("_", "").isalnum() or len(job_id) > 64):
        raise ConfigurationError(f"job id {job_id!r}: letters, digits, '-' and '_' only, at most 64 characters")
    out = os.path.abspath(output)
    private = _deid_fields(ctx, deid, link_table)  # a missing key refuses the export here, before anything is read
    ledger = ctx.ledger
    rows, description = cohort_rows(cohort, skip_bad_rows)
    # the filter and the de-identification (profile and key) are part of what the export is: another filter or key
    # is another job, with other expected instances or other files
    rules = filters.model_dump_json() if filters is not None and filters.active else ""
    seed = f"{source}\n{out}\n{layout}\n" + (f"{rules}\n" if rules else "")
    seed += f"{private['deid']}\n{private['deid_check']}\n" if private["deid"] else ""
    token, derived, bad = _stage(ledger, rows, seed)
    try:
        if not ledger.staged_count(token):
            raise CohortError(f"{description.partition(':')[2]}: no cohort rows to export")
        if job_id is None:
            job_id = f"{derived}-{secrets.token_hex(3)}" if new_job else derived
        fields: dict[str, str | int] = {
            "source": source,
            "output": out,
            "layout": layout,
            "batch_size": batch_size,
            "cohort": description,
        }
        _create_or_reopen(ledger, job_id, {**fields, "filters": rules, **private})
    except BaseException:
        ledger.drop_staged_rows(token)
        raise
    ledger.adopt_staged_rows(job_id, token)
    for line in bad:
        ledger.record_bad_row(job_id, line)
    for queued, row_id in enumerate(ledger.rows(job_id), start=1):
        ctx.publisher.expand(job_id, source, row_id)
        if queued % CANCEL_CHECK_EVERY == 0:
            if ledger.state(job_id) == JobState.CANCELLED.value:
                break  # cancel stops queueing
            ledger.touch(job_id)  # a long cohort is still being queued: the watchdog must not call the job stalled
    if ledger.producer_done(job_id):
        finalize_job(ledger, job_id)
    return job_id


def _deid_fields(ctx: EngineContext, deid: str | None, link_table: Path | None) -> dict[str, str]:
    """The job record's de-identification fields; the key is read (and checked present) here."""
    if deid is None:
        if link_table is not None:
            raise ConfigurationError("a linking table (--link-table) needs a de-identified export (--deid PROFILE)")
        return {"deid": "", "deid_check": "", "link_table": ""}
    profile = ctx.settings.deid_profile(deid)
    return deid_job_fields(deid, profile, profile.read_key(f"[deid.{deid}]"), link_table)


def _create_or_reopen(ledger: Ledger, job_id: str, fields: dict[str, str | int]) -> None:
    """A new job, or the same export run again: reopened for expansion, failed instances given a fresh budget.

    The job record carries what workers must know of the export besides the messages: its layout and its series
    filter (``filters``, JSON), so a filter reaches every worker on every host through the ledger."""
    if ledger.create_job(job_id, fields):
        return
    existing = ledger.job_fields(job_id)
    for key in ("source", "output", "layout", "filters", "deid", "deid_check", "link_table"):
        if existing.get(key, "") != str(fields[key]):
            raise ConfigurationError(
                f"job {job_id} exists with {key} {existing.get(key)!r}, not {fields[key]!r}; "
                "choose another job id or the same settings"
            )
    ledger.reopen(job_id, JobState.EXPANDING)
    ledger.clear_bad_rows(job_id)
    for _, series, uids in ledger.failed(job_id):
        ledger.unfail(job_id, series, uids)
