"""Expansion: one cohort row becomes the instances it stands for, recorded as expected, and fetch messages.

:func:`expand_row` is the body of the ``trolley.expand_study`` task. A study row asks the searcher for the study at
INSTANCE depth (``find_study_by_id``); a search row (AccessionNumber, PatientID, dates, a Query) finds the matching
studies and queues one study row each, so expansion stays one study per task and spreads over the workers.

Each series' instances go to the ledger in one Lua call (counted once, however often the row is expanded), and out
as fetch messages of up to ``batch_size`` instances of that series. Searches hold a slot of the source's throttle
like fetches do: the PACS counts them alike. Failures go through the same retry table as fetches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trolley_tasks.cohort import CohortRow
from trolley_tasks.core import QueryLevels, Study
from trolley_tasks.engine.context import EngineContext, SourceRuntime
from trolley_tasks.engine.dispatch import publish_series
from trolley_tasks.engine.fetch import MAX_HOLD
from trolley_tasks.engine.models import Failure
from trolley_tasks.engine.policy import Action
from trolley_tasks.engine.report import finalize_job
from trolley_tasks.engine.throttle import ThrottleBusy
from trolley_tasks.errors import NotFoundError, StudyNotFoundError, TrolleyError

log = logging.getLogger("trolley.engine.expand")

SEARCH_SLOT_WAIT = 20.0


@dataclass
class ExpandResult:
    instances: int = 0
    messages: int = 0
    studies: int = 0
    dropped: str = ""
    retry_in: float | None = None
    failed: str = ""
    finalized: bool = False


def expand_row(ctx: EngineContext, job: str, source: str, row_key: str, attempt: int = 1) -> ExpandResult:
    """Expand one row (see the module docstring). ``attempt`` counts the tries of this row so far, this one
    included."""
    result = ExpandResult()
    state = ctx.ledger.state(job)
    meta = ctx.job(job)
    if state not in ("expanding", "running") or meta is None:
        # paused: resume re-queues every row not yet expanded; cancelled or gone: nothing to do
        result.dropped = f"job is {state or 'gone'}"
        return result
    runtime = ctx.source(source)
    wait = runtime.throttle.seconds_until_open()
    if wait > 0:
        result.retry_in = min(wait, MAX_HOLD)
        ctx.publisher.expand(job, source, row_key, attempt, countdown=result.retry_in)
        return result
    row = CohortRow.from_key(row_key)
    if row.instance_uids:
        # the cohort names every instance (an instance-level CSV or references): nothing to ask the PACS; an
        # instance it lacks fails at fetch time as not-found
        _record_instances(ctx, job, source, meta.batch_size, row, result)
        if ctx.ledger.row_done(job, row_key):
            result.finalized = True
            finalize_job(ctx.ledger, job)
        return result
    try:
        with runtime.throttle.slot(max_wait=SEARCH_SLOT_WAIT):
            if row.study_uid:
                found: Study | list[Study] = runtime.searcher.find_study_by_id(row.study_uid, QueryLevels.INSTANCE)
            else:
                found = runtime.searcher.find_studies(row.to_query())
    except ThrottleBusy:
        result.retry_in = 2.0
        ctx.publisher.expand(job, source, row_key, attempt, countdown=result.retry_in)
        return result
    except TrolleyError as exc:
        return _expansion_failed(ctx, runtime, job, source, row, row_key, attempt, exc, result)
    if isinstance(found, list):
        if not found:
            none = StudyNotFoundError(f"no study matches {row.describe()}", source=source)
            return _expansion_failed(ctx, runtime, job, source, row, row_key, attempt, none, result)
        for study in found:
            study_row = CohortRow(study_uid=study.uid).key()
            if ctx.ledger.add_row(job, study_row):
                ctx.publisher.expand(job, source, study_row)
                result.studies += 1
    else:
        missing = _record_study(ctx, job, source, meta.batch_size, found, row, result)
        if missing:
            error = NotFoundError(f"not in the study on the server: {', '.join(missing[:5])}", source=source)
            result.failed = error.message
            result.finalized = ctx.ledger.row_done(
                job, row_key, Failure.of(error, attempt, study_uid=row.study_uid, row=row.describe())
            )
            if result.finalized:
                finalize_job(ctx.ledger, job)
            return result
    if ctx.ledger.row_done(job, row_key):
        result.finalized = True
        finalize_job(ctx.ledger, job)
    return result


def _record_instances(
    ctx: EngineContext, job: str, source: str, batch_size: int, row: CohortRow, result: ExpandResult
) -> None:
    by_series: dict[str, list[str]] = {}
    for series_uid, uid in zip(row.series_uids, row.instance_uids, strict=True):
        by_series.setdefault(series_uid, []).append(uid)
    for series_uid, uids in by_series.items():
        publish = ctx.ledger.expand(job, row.study_uid, series_uid, uids)
        result.instances += len(uids)
        result.messages += publish_series(ctx, job, source, row.study_uid, series_uid, publish, batch_size)


def _record_study(
    ctx: EngineContext, job: str, source: str, batch_size: int, study: Study, row: CohortRow, result: ExpandResult
) -> list[str]:
    """Record and publish the study's instances (restricted to the row's series/instances). Returns the series
    the row names that the server does not have."""
    wanted_series = set(row.series_uids)
    present = {series.uid for series in study.series}
    for series in study.series:
        if wanted_series and series.uid not in wanted_series:
            continue
        uids = [i.uid for i in series.instances]
        publish = ctx.ledger.expand(job, study.uid, series.uid, uids)
        result.instances += len(uids)
        result.messages += publish_series(ctx, job, source, study.uid, series.uid, publish, batch_size)
    return sorted(wanted_series - present)


def _expansion_failed(
    ctx: EngineContext,
    runtime: SourceRuntime,
    job: str,
    source: str,
    row: CohortRow,
    row_key: str,
    attempt: int,
    error: TrolleyError,
    result: ExpandResult,
) -> ExpandResult:
    error_class, decision = runtime.policy.decide(error)
    if decision.action is Action.PAUSE_JOB:
        ctx.ledger.pause(job, f"{error_class.value}: {error.message}")
        result.dropped = "job paused"
        return result
    if decision.shrink_concurrency:
        runtime.throttle.busy()
    if decision.action is Action.RETRY and not decision.exhausted(attempt):
        result.retry_in = decision.delay(attempt, error.retry_after)
        ctx.publisher.expand(job, source, row_key, attempt + 1, countdown=result.retry_in)
        return result
    result.failed = f"{error_class.value}: {error.message}"
    log.warning("job %s: row %s failed: %s", job, row.describe(), result.failed)
    if ctx.ledger.row_done(job, row_key, Failure.of(error, attempt, study_uid=row.study_uid, row=row.describe())):
        result.finalized = True
        finalize_job(ctx.ledger, job)
    return result
