"""Expansion: one cohort row becomes the instances it stands for, recorded as expected, and fetch messages.

:func:`expand_row` is the body of the ``trolley.expand_study`` task. A study row asks the searcher for the study at
INSTANCE depth (``find_study_by_id``); a search row (AccessionNumber, PatientID, dates, a Query) finds the matching
studies and queues one study row each, so expansion stays one study per task and spreads over the workers.

Each series' instances go to the ledger in one Lua call (counted once, however often the row is expanded), and out
as fetch messages (:mod:`~trolley_tasks.engine.dispatch`). Searches hold a slot of the source's throttle like
fetches do, kept alive by a heartbeat for as long as the search takes: the PACS counts them alike. Failures go
through the same retry table and the same breaker as fetches, and each request of a search is retried on its own by
the HTTP transport first, so one flaky request does not cost the whole expansion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trolley_tasks.cohort import CohortRow
from trolley_tasks.core import InstanceReference, QueryLevels, Series, Study
from trolley_tasks.deid import DeidProfile
from trolley_tasks.engine.context import EngineContext, SourceRuntime
from trolley_tasks.engine.dispatch import publish_series
from trolley_tasks.engine.fetch import BUSY_REQUEUE
from trolley_tasks.engine.heartbeat import Heartbeat
from trolley_tasks.engine.ledger import Expansion, Stored
from trolley_tasks.engine.models import Exclusion, Failure
from trolley_tasks.engine.outcomes import as_engine_error, host_condition
from trolley_tasks.engine.policy import Action
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


def expand_row(ctx: EngineContext, job: str, source: str, row_id: str, attempt: int = 1) -> ExpandResult:
    """Expand one row (see the module docstring). ``attempt`` counts the tries of this row so far, this one
    included. Nothing escapes without a decision: any error ends in a retry (parked until due), a failed row, or a
    paused job; an error outside the tree is recorded as a failed row, and the row's message is never lost."""
    result = ExpandResult()
    state = ctx.ledger.state(job)
    meta = ctx.job(job)
    if state not in ("expanding", "running") or meta is None:
        # paused: resume re-queues every row not yet expanded; cancelled or gone: nothing to do
        result.dropped = f"job is {state or 'gone'}"
        return result
    try:
        runtime = ctx.source(source)
    except TrolleyError as exc:  # this host lacks the profile or its secret
        ctx.ledger.pause(job, host_condition(exc) or exc.message)
        result.dropped = "job paused"
        return result
    hold, probe = runtime.gate()
    if hold > 0:
        result.retry_in = hold
        ctx.publisher.expand(job, source, row_id, attempt, countdown=hold)
        return result
    row = ctx.ledger.row(job, row_id)
    if row is None:
        result.dropped = "unknown row"
        return result
    try:
        with Heartbeat(ctx.ledger, job, ctx.lease_seconds) as beat:
            finished = _expand(ctx, runtime, beat, job, source, meta.batch_size, row, row_id, attempt, result)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            ctx.publisher.expand(job, source, row_id, attempt)  # the worker is going away: hand the row back
            raise
        finished = _expansion_failed(ctx, runtime, job, source, row, row_id, attempt, exc, probe, result)
    finally:
        if probe:
            runtime.breaker.release_probe()  # a verdict already cleared it; otherwise let the next one probe
    if finished:
        result.finalized = True
        ctx.publisher.finalize(job)
    return result


def _expand(
    ctx: EngineContext,
    runtime: SourceRuntime,
    beat: Heartbeat,
    job: str,
    source: str,
    batch_size: int,
    row: CohortRow,
    row_id: str,
    attempt: int,
    result: ExpandResult,
) -> bool:
    """The expansion proper; returns True when the row's end completed the job."""
    if row.instance_uids:
        # the cohort names every instance (an instance-level CSV or references): nothing to ask the PACS; an
        # instance it lacks fails at fetch time as not-found
        _record_instances(ctx, job, source, batch_size, row, result)
        return ctx.ledger.row_done(job, row_id)
    try:
        with runtime.throttle.slot(max_wait=SEARCH_SLOT_WAIT) as slot:
            beat.watch(slot)
            if row.study_uid:
                found: Study | list[Study] = runtime.searcher.find_study_by_id(row.study_uid, QueryLevels.INSTANCE)
            else:
                found = runtime.searcher.find_studies(row.to_query())
    except ThrottleBusy:
        result.retry_in = BUSY_REQUEUE
        ctx.publisher.expand(job, source, row_id, attempt, countdown=result.retry_in)
        return False
    runtime.breaker.success()
    if isinstance(found, list):
        if not found:
            raise StudyNotFoundError(f"no study matches {row.describe()}", source=source)
        for study in found:
            study_row = CohortRow(study_uid=study.uid, line=row.line)
            if ctx.ledger.add_row(job, study_row):
                ctx.publisher.expand(job, source, study_row.row_id())
                result.studies += 1
        return ctx.ledger.row_done(job, row_id)
    missing = _record_study(ctx, job, source, batch_size, found, row, result)
    if missing:
        error = NotFoundError(f"not in the study on the server: {', '.join(missing[:5])}", source=source)
        result.failed = error.message
        return ctx.ledger.row_done(job, row_id, Failure.of(error, attempt, study_uid=row.study_uid, row=row.describe()))
    return ctx.ledger.row_done(job, row_id)


def _record_instances(
    ctx: EngineContext, job: str, source: str, batch_size: int, row: CohortRow, result: ExpandResult
) -> None:
    by_series: dict[str, list[str]] = {}
    for series_uid, uid in zip(row.series_uids, row.instance_uids, strict=True):
        by_series.setdefault(series_uid, []).append(uid)
    for series_uid, uids in by_series.items():
        publish = _to_publish(
            ctx, job, row.study_uid, series_uid, ctx.ledger.expand(job, row.study_uid, series_uid, uids)
        )
        result.instances += len(uids)
        result.messages += publish_series(ctx, job, source, row.study_uid, series_uid, publish, batch_size)


def _to_publish(ctx: EngineContext, job: str, study_uid: str, series_uid: str, expansion: Expansion) -> list[str]:
    """The instances of a series to fetch now: the ledger's pending ones, and the done ones whose file is no
    longer in the output as stored (gone, or another size: deleted or cut short since), which go back to pending.
    A re-run of an export thus fetches again what left the output, and the report's "on disk" stays true.

    Where to look: the path the ledger kept, or, when it kept none (a layout made of UIDs only), where the layouts
    put the instance, under its pseudonyms in a de-identified export. One ``stat`` per done instance, on
    re-expansion only (a first expansion has none). An error other than "not there" (a disk that does not answer)
    raises: the expansion's error handling decides, and nothing is put back."""
    meta = ctx.job(job)
    if not expansion.stored or meta is None:
        return expansion.publish
    output = Path(meta.output)
    storage = ctx.storage(meta.layout)
    deid = ctx.deidentifier(job)
    gone: list[Stored] = []
    for item in expansion.stored:
        if item.path:
            size = _size_of(output / item.path)
        else:
            ref = InstanceReference(study_uid, series_uid, item.instance_uid)
            size = storage.stored_size(deid.reference(ref) if deid is not None else ref, output)
        if size != item.size:
            gone.append(item)
    back = ctx.ledger.unstore(job, series_uid, gone)
    if back:
        log.warning("job %s: %d done instance(s) no longer in the output; fetching them again", job, len(back))
    return [*expansion.publish, *back]


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


def _record_study(
    ctx: EngineContext, job: str, source: str, batch_size: int, study: Study, row: CohortRow, result: ExpandResult
) -> list[str]:
    """Record and publish the study's instances (restricted to the row's series/instances). Returns the series
    the row names that the server does not have."""
    wanted_series = set(row.series_uids)
    present = {series.uid for series in study.series}
    rules = ctx.job(job)
    series_filter = rules.filters if rules is not None else None
    if rules is not None and rules.link_table:  # the linking table's originals, also for studies already on disk
        values = {kw: str(study.data.get(kw, "") or "") for kw in ("PatientID", "AccessionNumber")}
        if any(values.values()):
            ctx.ledger.link(job, {study.uid: values})
    for series in study.series:
        if wanted_series and series.uid not in wanted_series:
            continue
        uids = [i.uid for i in series.instances]
        if series_filter is not None:
            rule = series_filter.exclusion(series)
            if rule is not None:  # never expected: not in the ledger's counts, listed with its rule instead
                ctx.ledger.exclude(
                    job, Exclusion(study_uid=study.uid, series_uid=series.uid, rule=rule, instances=len(uids))
                )
                continue
            uids = series_filter.kept_instances(series)
        if rules is not None and rules.deid is not None:
            uids = _deid_kept(ctx, job, study.uid, series, uids, rules.deid)
            if not uids:
                continue
        publish = _to_publish(ctx, job, study.uid, series.uid, ctx.ledger.expand(job, study.uid, series.uid, uids))
        result.instances += len(uids)
        result.messages += publish_series(ctx, job, source, study.uid, series.uid, publish, batch_size)
    return sorted(wanted_series - present)


def _deid_kept(
    ctx: EngineContext, job: str, study_uid: str, series: Series, uids: list[str], profile: DeidProfile
) -> list[str]:
    """The instances the de-identification profile keeps, by the SOPClassUID the search returned; the others are
    recorded as excluded with the profile's reason (the whole series when none is kept), never expected. What the
    search cannot tell (``BurnedInAnnotation``) is decided by the fetch, from the header."""
    wanted = set(uids)
    kept: list[str] = []
    left_out: list[tuple[str, str]] = []
    for instance in series.instances:
        if instance.uid not in wanted:
            continue
        reason = profile.exclusion(str(instance.data.get("SOPClassUID", "") or ""), None)
        if reason is None:
            kept.append(instance.uid)
        else:
            left_out.append((instance.uid, reason))
    if left_out and not kept:
        whole = Exclusion(study_uid=study_uid, series_uid=series.uid, rule=left_out[0][1], instances=len(left_out))
        ctx.ledger.exclude(job, whole)
    else:
        for uid, rule in left_out:
            exclusion = Exclusion(study_uid=study_uid, series_uid=series.uid, instance_uid=uid, rule=rule, instances=1)
            ctx.ledger.exclude(job, exclusion)
    return kept


def _expansion_failed(
    ctx: EngineContext,
    runtime: SourceRuntime,
    job: str,
    source: str,
    row: CohortRow,
    row_id: str,
    attempt: int,
    raw: Exception,
    probe: bool,
    result: ExpandResult,
) -> bool:
    """Retry, fail or pause, like a fetch (the breaker too: a held source costs no attempt, except to its probe).
    Returns True when a failed row completed the job."""
    error = as_engine_error(raw)
    error_class, decision = runtime.policy.decide(error)
    reason = host_condition(error)
    if reason or decision.action is Action.PAUSE_JOB:
        message = error.message if isinstance(error, TrolleyError) else str(error)
        ctx.ledger.pause(job, reason or f"{error_class.value}: {message}")
        result.dropped = "job paused"
        return False
    retry_after = error.retry_after if isinstance(error, TrolleyError) else None
    held = runtime.breaker.failure(error_class, retry_after)
    if decision.shrink_concurrency:
        runtime.throttle.busy()
    if held > 0 and decision.action is Action.RETRY and not (probe and decision.exhausted(attempt)):
        result.retry_in = held  # the source is held: no attempt spent, unless this was its probe
        ctx.publisher.expand(job, source, row_id, attempt + 1 if probe else attempt, countdown=held)
        return False
    if decision.action is Action.RETRY and not decision.exhausted(attempt):
        result.retry_in = decision.delay(attempt, retry_after)
        ctx.publisher.expand(job, source, row_id, attempt + 1, countdown=result.retry_in)
        return False
    failure = Failure.of(error, attempt, study_uid=row.study_uid, row=row.describe())
    result.failed = f"{error_class.value}: {failure.message}"
    log.warning("job %s: row %s failed: %s", job, ctx.redact(job, row.describe()), ctx.redact(job, result.failed))
    return ctx.ledger.row_done(job, row_id, failure)
