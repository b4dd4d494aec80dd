"""Publishing fetch work: the ONE place that cuts a series' pending instances into fetch messages.

Expansion, resume, retry-failed and the re-queue of a fetch all send instances of one series to the workers; they all
call :func:`publish_series`, so the batch size rule (and the downloader's preference for whole series) lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

from trolley_tasks.engine.context import EngineContext
from trolley_tasks.engine.messages import FetchMessage


def publish_series(
    ctx: EngineContext, job: str, source: str, study: str, series: str, uids: Sequence[str], batch_size: int
) -> int:
    """Publish ``uids`` (instances of one series) as fetch messages of at most ``batch_size``; return how many.

    A downloader that fetches a whole series per request (``whole_series``, WADO-RS) gets the series in one
    message: a batch smaller than the series would make it download the series once per batch.
    """
    if not uids:
        return 0
    if ctx.source(source).whole_series:
        batch_size = max(batch_size, len(uids))
    sent = 0
    for start in range(0, len(uids), batch_size):
        ctx.publisher.fetch(FetchMessage(job, source, study, series, tuple(uids[start : start + batch_size])))
        sent += 1
    return sent


def republish(ctx: EngineContext, job: str) -> int:
    """Queue every pending instance (and every row not yet expanded) of the job again; return messages sent.

    A message that is still in the broker for one of them finds the instance claimed or terminal and does nothing,
    so publishing twice never fetches twice (the ledger's claim decides).
    """
    meta = ctx.job(job)
    if meta is None:
        return 0
    sent = 0
    for row in ctx.ledger.unexpanded_rows(job):
        ctx.publisher.expand(job, meta.source, row)
        sent += 1
    for study, series, uids in ctx.ledger.pending(job):
        sent += publish_series(ctx, job, meta.source, study, series, uids, meta.batch_size)
    return sent
