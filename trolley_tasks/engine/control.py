"""Job control: pause, resume, cancel, retry-failed. Each is one ledger transition plus, where needed, re-queueing.

- **pause**: the job's state says ``paused``; fetches already running finish their batch, every message that
  arrives afterwards is dropped without touching the PACS. Nothing is lost: the ledger knows what is pending.
- **resume**: the state goes back to what it was, and everything still pending (and every row not yet expanded) is
  published again. A message that survived the pause finds its instances already claimed and is skipped.
- **cancel**: stop queueing and drop pending work; what is done stays done, and the report is written.
- **retry-failed**: failed instances (and rows whose expansion failed) go back to pending with a fresh attempt
  budget and are queued again; everything else is left alone.
"""

from __future__ import annotations

from trolley_tasks.engine.context import EngineContext, FetchMessage, batches
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.report import finalize_job


def _source_and_batch(ctx: EngineContext, job_id: str) -> tuple[str, int]:
    fields = ctx.ledger.job_fields(job_id)
    if not fields:
        raise KeyError(job_id)
    return fields["source"], int(fields.get("batch_size") or 50)


def republish(ctx: EngineContext, job_id: str) -> int:
    """Queue every pending instance (and every row not yet expanded) of the job again. Returns messages sent."""
    source, batch_size = _source_and_batch(ctx, job_id)
    sent = 0
    for row in ctx.ledger.unexpanded_rows(job_id):
        ctx.publisher.expand(job_id, source, row)
        sent += 1
    for study, series, uids in ctx.ledger.pending(job_id):
        for batch in batches(uids, batch_size):
            ctx.publisher.fetch(FetchMessage(job_id, source, study, series, tuple(batch)))
            sent += 1
    return sent


def pause(ctx: EngineContext, job_id: str, reason: str = "paused by the user") -> bool:
    """Pause an active job. False when it was not active (already paused or ended)."""
    return ctx.ledger.pause(job_id, reason)


def resume(ctx: EngineContext, job_id: str) -> bool:
    """Resume a paused job and queue what is pending. False when it was not paused."""
    resumed, finalized = ctx.ledger.resume(job_id)
    if finalized:
        finalize_job(ctx.ledger, job_id)
    elif resumed:
        republish(ctx, job_id)
    return resumed


def cancel(ctx: EngineContext, job_id: str) -> bool:
    """Cancel an active or paused job; keeps what is done and writes the report. False when it had ended."""
    if ctx.ledger.cancel(job_id):
        finalize_job(ctx.ledger, job_id)
        return True
    return False


def retry_failed(ctx: EngineContext, job_id: str) -> int:
    """Queue the failed instances and failed rows again, with a fresh budget. Returns how many were re-queued.

    An ended job becomes ``running`` again; a paused one stays paused (its failed instances become pending and go
    out on resume).
    """
    source, batch_size = _source_and_batch(ctx, job_id)
    ledger = ctx.ledger
    status = ledger.status(job_id)
    if status is None or (status.failed == 0 and status.rows_failed == 0):
        return 0
    ledger.reopen(job_id, JobState.RUNNING)
    paused = ledger.state(job_id) == JobState.PAUSED.value
    moved = 0
    for row, _ in list(ledger.row_failures(job_id)):
        if ledger.unfail_row(job_id, row):
            moved += 1
            if not paused:
                ctx.publisher.expand(job_id, source, row)
    for study, series, uids in list(ledger.failed(job_id)):
        again = ledger.unfail(job_id, series, uids)
        moved += len(again)
        if not paused:
            for batch in batches(again, batch_size):
                ctx.publisher.fetch(FetchMessage(job_id, source, study, series, tuple(batch)))
    if moved == 0 and ledger.check(job_id):
        finalize_job(ledger, job_id)
    return moved
