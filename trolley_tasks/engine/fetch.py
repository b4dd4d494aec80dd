"""The fetch: a batch of instances of one series, from the PACS to verified files, accounted per instance.

:func:`fetch_batch` is the whole body of the ``trolley.fetch`` task, as a plain function:

1. the source's time window: outside it the batch is re-queued with a countdown (no worker is held);
2. the ledger claims each instance (an instance already done, failed or held by a live fetch is skipped; a
   redelivered one counts a redelivery and is failed as poison past the limit);
3. an instance whose file is already on disk and valid is counted done without a fetch;
4. one concurrency slot of the source's throttle is held while the downloader's raw path streams the rest to
   storage (atomic write, SOPInstanceUID checked, no pixel decoding); tokens of the rate limit are taken as it goes;
5. cheap failures are retried at once (tenacity); every other failure goes through the retry table
   (:mod:`trolley_tasks.engine.policy`): re-queue with a countdown (only the failed instances), fail the
   instance, or pause the job;
6. one Lua call settles every instance; if that completed the job, this worker finalizes it (report, expiry).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import RetryCallState, Retrying, stop_after_attempt, wait_random_exponential

from trolley_tasks.core import InstanceReference
from trolley_tasks.downloaders.base import RawPayload
from trolley_tasks.engine.context import EngineContext, FetchMessage, SourceRuntime
from trolley_tasks.engine.ledger.ledger import Settled
from trolley_tasks.engine.models import Failure
from trolley_tasks.engine.policy import Action
from trolley_tasks.engine.report import finalize_job
from trolley_tasks.engine.throttle import ThrottleBusy
from trolley_tasks.errors import ErrorClass, NotFoundError, TrolleyError, UnsafePathError, error_class_of
from trolley_tasks.storage.disk import QUARANTINE_DIR, DICOMDiskStorage, QuarantinedPayloadError, SaveResult
from trolley_tasks.storage.durable import Committer
from trolley_tasks.storage.layouts import path_component

log = logging.getLogger("trolley.engine.fetch")

MAX_HOLD = 600.0
"""Longest countdown of a held batch (window closed): it is re-checked at least this often."""
SLOT_WAIT = 20.0
"""How long a fetch waits for a concurrency slot before it re-queues itself and frees the worker."""
BUSY_REQUEUE = 2.0


@dataclass
class FetchResult:
    """What one fetch did, for logs and tests."""

    claimed: int = 0
    fetched: int = 0
    skipped: int = 0
    failed: int = 0
    requeued: int = 0
    held: float = 0.0
    dropped: str = ""
    paused: bool = False
    finalized: bool = False
    errors: dict[str, str] = field(default_factory=dict)


def failure_for(ref: InstanceReference, error: BaseException, attempts: int) -> Failure:
    """The failure record of one instance. Messages of our errors carry no secrets (http.redact_url)."""
    error_class = error_class_of(error)
    message = error.message if isinstance(error, TrolleyError) else f"{type(error).__name__}: {error}"
    return Failure(
        study_uid=ref.study_uid,
        series_uid=ref.series_uid,
        instance_uid=ref.instance_uid,
        error_class=(error_class.value if error_class else "request-rejected"),
        error=type(error).__name__,
        message=message,
        attempts=attempts,
    )


def relative_path(storage: DICOMDiskStorage, result: SaveResult, output: str) -> str:
    """The path to keep in the ledger: empty when the layout derives it from the UIDs (saves Redis memory)."""
    if storage.template is not None and not storage.template.needs_dataset:
        return ""
    return os.path.relpath(result.path, output)


class _Kept:
    """Passes a chunked payload through, holding references to its chunks (no copy) until the instance is stored,
    so that the part of an instance whose stream broke can still be kept in quarantine."""

    def __init__(self, payload: RawPayload) -> None:
        self.payload = payload
        self.chunks: list[bytes] = []

    def stream(self) -> RawPayload:
        if isinstance(self.payload, bytes):
            return self.payload
        return self._chunks(self.payload)

    def _chunks(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.chunks.append(chunk)
            yield chunk


def quarantine_partial(output: str, instance_uid: str, chunks: list[bytes]) -> Path:
    """Write the bytes of a broken instance to ``<out>/quarantine/<SOPInstanceUID>.bad`` (atomically), like the
    storage does for whole payloads that are not the instance asked for."""
    from trolley_tasks.storage.durable import write_file  # the one atomic writer

    target = Path(output) / QUARANTINE_DIR / f"{path_component(instance_uid, 'SOPInstanceUID', is_uid=True)}.bad"
    write_file(target, chunks)
    log.warning("kept the %d bytes received of %s in %s", sum(map(len, chunks)), instance_uid, target)
    return target


def _drain(payload: RawPayload) -> None:
    if not isinstance(payload, bytes):
        for _ in payload:
            pass


class _Download:
    """One pass of the downloader over the refs still wanted; per-instance results accumulate across passes."""

    def __init__(self, runtime: SourceRuntime, storage: DICOMDiskStorage, output: str) -> None:
        self.runtime = runtime
        self.storage = storage
        self.output = output
        self.saved: dict[str, SaveResult] = {}
        self.bad: dict[str, BaseException] = {}
        self.tries: dict[str, int] = {}
        self.committer = Committer()

    def flush(self) -> None:
        """Make every saved file durable (fsyncs ran behind the download); a file that could not be committed is
        not saved, whatever its bytes were."""
        for uid, error in self.committer.flush().items():
            self.saved.pop(uid, None)
            self.bad[uid] = error

    def remaining(self, refs: list[InstanceReference]) -> list[InstanceReference]:
        return [r for r in refs if r.instance_uid not in self.saved and r.instance_uid not in self.bad]

    def run(self, refs: list[InstanceReference], keepalive: Iterator[None]) -> None:
        wanted = {r.instance_uid: r for r in self.remaining(refs)}
        if not wanted:
            return
        for uid in wanted:
            self.tries[uid] = self.tries.get(uid, 0) + 1
        throttle = self.runtime.throttle
        throttle.take()
        first = True
        for ref, payload in self.runtime.downloader.iter_raw(list(wanted.values())):
            next(keepalive)
            if not first:
                throttle.take()
            first = False
            uid = ref.instance_uid
            if uid not in wanted or uid in self.saved:
                _drain(payload)
                continue
            kept = _Kept(payload)
            try:
                self.saved[uid] = self.storage.save_raw(
                    wanted[uid], kept.stream(), self.output, committer=self.committer
                )
            except (QuarantinedPayloadError, UnsafePathError) as exc:  # this instance only; the stream goes on
                self.bad[uid] = exc
            except TrolleyError as exc:
                # the stream broke inside this instance (a truncated multipart): keep what came, for a person
                if exc.error_class is ErrorClass.PAYLOAD_INVALID and kept.chunks:
                    quarantine_partial(self.output, uid, kept.chunks)
                raise


def _quick_retry(runtime: SourceRuntime, prior: int) -> Retrying:
    """Immediate retries for the classes that allow them, never past the attempt budget (``prior`` tries were
    spent before this fetch)."""

    def should_retry(state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if error is None:
            return False
        _, decision = runtime.policy.decide(error)
        return (
            decision.action is Action.RETRY
            and decision.quick_retries >= state.attempt_number
            and prior + state.attempt_number < decision.max_attempts
        )

    quick = max(d.quick_retries for d in runtime.policy.table.values())
    return Retrying(
        stop=stop_after_attempt(1 + quick),
        wait=wait_random_exponential(multiplier=0.1, max=1.0),
        retry=should_retry,
        reraise=True,
    )


def fetch_batch(ctx: EngineContext, message: FetchMessage, *, redelivered: bool = False) -> FetchResult:
    """Fetch, verify, store and account one batch. See the module docstring."""
    result = FetchResult()
    meta = ctx.job(message.job)
    if meta is None:
        result.dropped = "unknown job"
        return result
    runtime = ctx.source(message.source)
    wait = runtime.throttle.seconds_until_open()
    if wait > 0:
        # outside the window: nothing is claimed, the message comes back when the window opens (or re-checks)
        result.held = min(wait, MAX_HOLD)
        ctx.publisher.fetch(message, countdown=result.held)
        return result
    claim = ctx.ledger.claim(
        message.job,
        message.series,
        message.instances,
        redelivered=redelivered,
        lease_seconds=ctx.lease_seconds,
        max_redeliveries=ctx.max_redeliveries,
    )
    if claim.finalized:
        result.finalized = finalize_job(ctx.ledger, message.job)
    if claim.job_state not in ("expanding", "running"):
        result.dropped = f"job is {claim.job_state or 'gone'}"
        return result
    claimed = claim.with_code("c")
    result.claimed = len(claimed)
    result.failed += len(claim.with_code("x"))
    if not claimed:
        return result
    storage = ctx.storage(meta.layout)
    refs = [InstanceReference(message.study, message.series, uid) for uid in claimed]
    settled: list[Settled] = []
    to_fetch: list[InstanceReference] = []
    for ref in refs:
        existing = storage.existing_valid(ref, meta.output)
        if existing is not None:
            attempts = claim.codes[ref.instance_uid][1]
            path = relative_path(storage, existing, meta.output)
            settled.append(Settled(ref.instance_uid, "s", attempts, size=existing.size, path=path))
            result.skipped += 1
        else:
            to_fetch.append(ref)
    if to_fetch:
        _fetch(ctx, message, runtime, storage, meta.output, to_fetch, claim.codes, settled, result)
    if ctx.ledger.settle(message.job, message.series, settled):
        result.finalized = finalize_job(ctx.ledger, message.job)
    return result


def _fetch(
    ctx: EngineContext,
    message: FetchMessage,
    runtime: SourceRuntime,
    storage: DICOMDiskStorage,
    output: str,
    refs: list[InstanceReference],
    codes: dict[str, tuple[str, int, float]],
    settled: list[Settled],
    result: FetchResult,
) -> None:
    download = _Download(runtime, storage, output)
    stream_error: BaseException | None = None
    try:
        with runtime.throttle.slot(max_wait=SLOT_WAIT) as slot:

            def keepalive() -> Iterator[None]:
                while True:
                    slot.keepalive()
                    yield

            beats = keepalive()
            try:
                for attempt in _quick_retry(runtime, max(codes[r.instance_uid][1] for r in refs)):
                    with attempt:
                        download.run(refs, beats)
                        missing = download.remaining(refs)
                        if missing:
                            # the contract says a short answer raises; a downloader that did not is still short
                            raise_short(runtime, missing)
            except TrolleyError as exc:
                stream_error = exc
                if exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.TIMEOUT):
                    runtime.reset_downloader()  # the next fetch opens fresh connections
            finally:
                download.flush()  # before the ledger hears of any of them: "done" means durable on disk
    except ThrottleBusy:
        # nothing was asked of the PACS: back to pending without spending an attempt, and try again shortly
        for ref in download.remaining(refs):
            uid = ref.instance_uid
            settled.append(Settled(uid, "p", codes[uid][1], codes[uid][2]))
        ctx.publisher.fetch(message.with_instances(r.instance_uid for r in refs), countdown=BUSY_REQUEUE)
        result.requeued += len(refs)
        return
    for uid, saved in download.saved.items():
        attempts = codes[uid][1] + download.tries.get(uid, 1)
        settled.append(Settled(uid, "d", attempts, size=saved.size, path=relative_path(storage, saved, output)))
        result.fetched += 1
    if download.saved and not download.bad and stream_error is None:
        runtime.throttle.success()
    errors = dict(download.bad)
    if stream_error is not None:
        errors.update({ref.instance_uid: stream_error for ref in download.remaining(refs)})
    _apply_policy(ctx, message, runtime, errors, download.tries, codes, settled, result)


def raise_short(runtime: SourceRuntime, missing: list[InstanceReference]) -> None:
    """A downloader that returned fewer instances than asked without raising broke its contract; the instances it
    did not deliver are not found, never silently missing."""
    raise NotFoundError(
        f"the server answered without {len(missing)} of the instances asked for",
        source=runtime.name,
        reference=missing[0],
    )


def _apply_policy(
    ctx: EngineContext,
    message: FetchMessage,
    runtime: SourceRuntime,
    errors: dict[str, BaseException],
    tries: dict[str, int],
    codes: dict[str, tuple[str, int, float]],
    settled: list[Settled],
    result: FetchResult,
) -> None:
    """Turn each failed instance into fail / re-queue / pause, per the retry table."""
    requeue: list[str] = []
    delay = 0.0
    shrunk = False
    now = time.time()
    for uid, error in errors.items():
        ref = InstanceReference(message.study, message.series, uid)
        prior, busy_at = codes[uid][1], codes[uid][2]
        error_class, decision = runtime.policy.decide(error)
        result.errors[uid] = f"{error_class.value}: {error}"
        if decision.action is Action.PAUSE_JOB:
            reason = f"{error_class.value}: {failure_for(ref, error, prior).message}"
            if ctx.ledger.pause(message.job, reason):
                log.warning("job %s paused: %s", message.job, reason)
            result.paused = True
            settled.append(Settled(uid, "p", prior, busy_at))
            continue
        attempts = prior + tries.get(uid, 1)
        if decision.budget_interval is not None:
            counted = now - busy_at >= decision.budget_interval
            attempts = prior + (1 if counted else 0)
            busy_at = now if counted else busy_at
        if decision.shrink_concurrency and not shrunk:
            runtime.throttle.busy()
            shrunk = True
        if decision.action is Action.RETRY and not decision.exhausted(attempts):
            settled.append(Settled(uid, "p", attempts, busy_at))
            requeue.append(uid)
            retry_after = error.retry_after if isinstance(error, TrolleyError) else None
            delay = max(delay, decision.delay(attempts, retry_after))
            continue
        settled.append(Settled(uid, "f", attempts, busy_at, failure=failure_for(ref, error, attempts)))
        result.failed += 1
    if requeue:
        ctx.publisher.fetch(message.with_instances(requeue), countdown=delay)
        result.requeued += len(requeue)
