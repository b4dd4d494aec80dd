"""The fetch: a batch of instances of one series, from the PACS to verified files, accounted per instance.

:func:`fetch_batch` is the whole body of the ``trolley.fetch`` task, as a plain function:

1. the source's time window and its breaker: when either holds, the batch is parked in Redis until it opens
   (nothing is claimed, no worker is held);
2. the ledger claims each instance (an instance already done, failed or held by a live fetch is skipped; a
   redelivered one counts a redelivery and is failed as poison past the limit); from here on a heartbeat keeps the
   claim (and later the concurrency slot) alive, and **everything** that happens is caught: each claimed instance
   ends settled, back in pending with a message, or in a paused job (:mod:`~trolley_tasks.engine.outcomes`);
3. an instance whose file is already on disk and valid is counted done without a fetch;
4. one concurrency slot of the source's throttle is held while the downloader's raw path streams the rest to
   storage (atomic write, SOPInstanceUID checked, no pixel decoding); tokens of the rate limit are taken as it goes;
   in a de-identified export (``--deid``) each header is rewritten on the way (the pixel data bytes pass unchanged)
   and the file is stored and checked under its pseudonyms; an instance the profile leaves out once its header is
   seen is settled as excluded, with nothing written;
5. cheap failures are retried at once (tenacity); every other failure goes through the retry table and the breaker:
   re-queue (only the failed instances, parked until due), fail the instance, or pause the job;
6. the plan is carried out: pause, then one Lua call settles every instance, then the re-queue is published; if
   the settle completed the job, a ``trolley.finalize`` task writes its report.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from tenacity import RetryCallState, Retrying, stop_after_attempt, wait_random_exponential

from trolley_tasks.core import InstanceReference
from trolley_tasks.deid import DeidentificationError, Deidentifier, ExcludedByProfile
from trolley_tasks.engine.context import EngineContext, JobMeta, SourceRuntime
from trolley_tasks.engine.heartbeat import Heartbeat
from trolley_tasks.engine.ledger import ClaimCode, Outcome, Settled
from trolley_tasks.engine.messages import FetchMessage
from trolley_tasks.engine.models import Exclusion, Failure
from trolley_tasks.engine.outcomes import Plan, apply_policy, carry_out, host_condition, rescue
from trolley_tasks.engine.policy import Action
from trolley_tasks.engine.throttle import ThrottleBusy
from trolley_tasks.errors import ErrorClass, NotFoundError, TrolleyError, UnsafePathError
from trolley_tasks.formats.part10 import RawPayload
from trolley_tasks.storage.disk import DICOMDiskStorage, QuarantinedPayloadError, SaveResult
from trolley_tasks.storage.durable import Committer, watch

log = logging.getLogger("trolley.engine.fetch")

SLOT_WAIT = 20.0
"""How long a fetch waits for a concurrency slot before it re-queues itself and frees the worker."""
BUSY_REQUEUE = 2.0


@dataclass
class FetchResult:
    """What one fetch did, for logs and tests. ``errors`` is one short line per error class, with counts."""

    claimed: int = 0
    fetched: int = 0
    skipped: int = 0
    failed: int = 0
    excluded: int = 0
    requeued: int = 0
    held: float = 0.0
    dropped: str = ""
    paused: bool = False
    finalized: bool = False
    errors: str = ""


def _failure(ref: InstanceReference, error: BaseException, attempts: int) -> Failure:
    return Failure.of(
        error, attempts, study_uid=ref.study_uid, series_uid=ref.series_uid, instance_uid=ref.instance_uid
    )


def relative_path(storage: DICOMDiskStorage, result: SaveResult, output: str) -> str:
    """The path to keep in the ledger: empty when the layout derives it from the UIDs (saves Redis memory)."""
    if storage.template is not None and not storage.template.needs_dataset:
        return ""
    return os.path.relpath(result.path, output)


def _drain(payload: RawPayload) -> None:
    if not isinstance(payload, bytes):
        for _ in payload:
            pass


class _Download:
    """One pass of the downloader over the refs still wanted; per-instance results accumulate across passes.

    With a ``deid`` (a de-identified export), each instance is rewritten on its way to disk and stored under its
    pseudonymous reference; an instance the profile leaves out ends in ``excluded`` with the reason, and
    ``links`` keeps each study's original PatientID and AccessionNumber when ``keep_links`` (a linking table)."""

    def __init__(
        self,
        runtime: SourceRuntime,
        storage: DICOMDiskStorage,
        output: str,
        tries: dict[str, int],
        deid: Deidentifier | None = None,
        keep_links: bool = False,
    ) -> None:
        self.runtime = runtime
        self.storage = storage
        self.output = output
        self.saved: dict[str, SaveResult] = {}
        self.bad: dict[str, BaseException] = {}
        self.excluded: dict[str, str] = {}
        self.links: dict[str, dict[str, str]] = {}
        self.tries = tries
        self.committer = Committer()
        watch(Path(output))  # before anything is written: the batch's first flush can then be one syncfs
        self.deid = deid
        self.keep_links = keep_links

    def existing(self, refs: list[InstanceReference]) -> dict[str, SaveResult]:
        """The valid files already in place for ``refs`` (under their pseudonyms in a de-identified export), by
        SOPInstanceUID of ``refs``."""
        if self.deid is None:
            return self.storage.existing_valid_many(refs, self.output)
        stored = {ref.instance_uid: self.deid.reference(ref) for ref in refs}
        found = self.storage.existing_valid_many(stored.values(), self.output)
        return {uid: found[target.instance_uid] for uid, target in stored.items() if target.instance_uid in found}

    def _save(self, ref: InstanceReference, payload: RawPayload) -> SaveResult:
        if self.deid is None:
            return self.storage.save_raw(ref, payload, self.output, committer=self.committer)
        seen = None
        if self.keep_links and ref.study_uid not in self.links:

            def seen(ds: Dataset) -> None:
                self.links[ref.study_uid] = {
                    "PatientID": str(ds.get("PatientID", "") or ""),
                    "AccessionNumber": str(ds.get("AccessionNumber", "") or ""),
                }

        stream = self.deid.stream(payload, seen)
        return self.storage.save_raw(self.deid.reference(ref), stream, self.output, committer=self.committer)

    def flush(self) -> dict[str, BaseException]:
        """Make every saved file durable (fsyncs ran behind the download); a file that could not be committed is
        not saved, whatever its bytes were. Returns those, by SOPInstanceUID; a second call has nothing to do."""
        errors = self.committer.flush()
        for uid in errors:
            self.saved.pop(uid, None)
        return errors

    def remaining(self, refs: list[InstanceReference]) -> list[InstanceReference]:
        done = (self.saved, self.bad, self.excluded)
        return [r for r in refs if not any(r.instance_uid in outcome for outcome in done)]

    def run(self, refs: list[InstanceReference], beat: Heartbeat) -> None:
        wanted = {r.instance_uid: r for r in self.remaining(refs)}
        if not wanted:
            return
        for uid in wanted:
            self.tries[uid] = self.tries.get(uid, 0) + 1
        throttle = self.runtime.throttle
        throttle.take()
        first = True
        for ref, payload in self.runtime.downloader.iter_raw(list(wanted.values())):
            beat.check()
            if not first:
                throttle.take()
            first = False
            uid = ref.instance_uid
            if uid not in wanted or uid in self.saved:
                _drain(payload)
                continue
            try:
                self.saved[uid] = self._save(wanted[uid], payload)
            except (QuarantinedPayloadError, UnsafePathError) as exc:  # this instance only; the stream goes on
                self.bad[uid] = exc
            except DeidentificationError as exc:  # refused from its header: the rest of its bytes are skipped
                self.bad[uid] = exc
                _drain(payload)
            except ExcludedByProfile as exc:
                self.excluded[uid] = exc.reason
                _drain(payload)


def _quick_retry(runtime: SourceRuntime, prior: int, probe: bool) -> Retrying:
    """Immediate retries for the classes that allow them, never past the attempt budget (``prior`` tries were
    spent before this fetch), and none for the probe of a held source: one try tells whether it is back."""

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

    quick = 0 if probe else max(d.quick_retries for d in runtime.policy.table.values())
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
    try:
        runtime = ctx.source(message.source)
        deid = ctx.deidentifier(message.job)
    except TrolleyError as exc:  # this host lacks the profile, its secret or the de-identification key: no claim
        reason = host_condition(exc) or exc.message
        result.paused = ctx.ledger.pause(message.job, reason)
        log.warning("job %s paused: %s", message.job, reason)
        return result
    hold, probe = runtime.gate()
    if hold > 0:
        result.held = hold
        ctx.publisher.fetch(message, countdown=hold)
        return result
    try:
        _claimed(ctx, message, runtime, meta, deid, redelivered, probe, result)
    finally:
        if probe:  # a verdict (success, failure) already cleared the probe; any other ending lets the next one probe
            runtime.breaker.release_probe()
    return result


def _claimed(
    ctx: EngineContext,
    message: FetchMessage,
    runtime: SourceRuntime,
    meta: JobMeta,
    deid: Deidentifier | None,
    redelivered: bool,
    probe: bool,
    result: FetchResult,
) -> None:
    """From the claim on: every claimed instance ends settled, back in pending with a message, or in a paused job."""
    claim = ctx.ledger.claim(
        message.job,
        message.series,
        message.instances,
        redelivered=redelivered,
        lease_seconds=ctx.lease_seconds,
        max_redeliveries=ctx.max_redeliveries,
    )
    if claim.finalized:
        result.finalized = True
        ctx.publisher.finalize(message.job)
    if claim.job_state not in ("expanding", "running"):
        result.dropped = f"job is {claim.job_state or 'gone'}"
        return
    claimed = claim.with_code(ClaimCode.CLAIMED)
    result.claimed = len(claimed)
    result.failed += len(claim.with_code(ClaimCode.POISON))
    if not claimed:
        return
    plan = Plan(probe=probe)
    tries: dict[str, int] = {}
    beat = Heartbeat(ctx.ledger, message.job, ctx.lease_seconds, message.series, claim.lease, claimed)
    try:
        with beat:
            download = _Download(runtime, ctx.storage(meta.layout), meta.output, tries, deid, meta.link_table)
            _work(ctx, message, download, claim.codes, claimed, beat, plan, result)
    except BaseException as exc:
        redact = functools.partial(ctx.redact, message.job)
        result.failed += rescue(exc, runtime, message, claimed, tries, claim.codes, plan, redact)
        _conclude(ctx, message, plan, result)
        raise
    _conclude(ctx, message, plan, result)


def _conclude(ctx: EngineContext, message: FetchMessage, plan: Plan, result: FetchResult) -> None:
    result.requeued += len(plan.requeue) if not plan.pause else 0
    result.paused = result.paused or bool(plan.pause)
    result.errors = plan.summary()
    if carry_out(ctx, message, plan):
        result.finalized = True
        ctx.publisher.finalize(message.job)


def _work(
    ctx: EngineContext,
    message: FetchMessage,
    download: _Download,
    codes: dict[str, tuple[ClaimCode, int, float]],
    claimed: list[str],
    beat: Heartbeat,
    plan: Plan,
    result: FetchResult,
) -> None:
    storage, output, tries = download.storage, download.output, download.tries
    to_fetch: list[InstanceReference] = []
    refs = [InstanceReference(message.study, message.series, uid) for uid in claimed]
    present = download.existing(refs)
    for ref in refs:
        uid = ref.instance_uid
        existing = present.get(uid)
        if existing is not None:
            path = relative_path(storage, existing, output)
            plan.settled.append(Settled(uid, Outcome.SKIPPED, codes[uid][1], size=existing.size, path=path))
            result.skipped += 1
        else:
            to_fetch.append(ref)
    if not to_fetch:
        return
    try:
        _fetch(ctx, message, download.runtime, download, to_fetch, codes, beat, plan, result)
    finally:
        # whatever happened, what reached the disk is made durable and counted: "done" means durable
        for uid, error in download.flush().items():
            download.bad[uid] = error
        settled = plan.settled_uids()
        for uid, saved in download.saved.items():
            if uid not in settled:
                attempts = codes[uid][1] + tries.get(uid, 1)
                path = relative_path(storage, saved, output)
                plan.settled.append(Settled(uid, Outcome.DONE, attempts, size=saved.size, path=path))
                result.fetched += 1
        for uid, reason in download.excluded.items():
            if uid not in settled:
                where = Exclusion(
                    study_uid=message.study, series_uid=message.series, instance_uid=uid, rule=reason, instances=1
                )
                plan.settled.append(Settled(uid, Outcome.EXCLUDED, codes[uid][1] + tries.get(uid, 1), exclusion=where))
                result.excluded += 1
        ctx.ledger.link(message.job, download.links)


def _fetch(
    ctx: EngineContext,
    message: FetchMessage,
    runtime: SourceRuntime,
    download: _Download,
    refs: list[InstanceReference],
    codes: dict[str, tuple[ClaimCode, int, float]],
    beat: Heartbeat,
    plan: Plan,
    result: FetchResult,
) -> None:
    stream_error: BaseException | None = None
    try:
        with runtime.throttle.slot(max_wait=SLOT_WAIT) as slot:
            beat.watch(slot)
            try:
                prior = max(codes[r.instance_uid][1] for r in refs)
                for attempt in _quick_retry(runtime, prior, plan.probe):
                    with attempt:
                        download.run(refs, beat)
                        missing = download.remaining(refs)
                        if missing:
                            # the contract says a short answer raises; a downloader that did not is still short
                            raise_short(runtime, missing)
            except TrolleyError as exc:
                stream_error = exc
                if exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.TIMEOUT):
                    runtime.reset_downloader()  # the next fetch opens fresh connections
            for uid, error in download.flush().items():
                download.bad[uid] = error
    except ThrottleBusy:
        # nothing was asked of the PACS: back to pending without spending an attempt, and try again shortly
        waiting = [ref.instance_uid for ref in download.remaining(refs)]
        plan.back_to_pending(waiting, codes)
        plan.requeue.extend(waiting)
        plan.delay = max(plan.delay, BUSY_REQUEUE)
        return
    if download.saved:
        runtime.breaker.success()  # the source answered with instances: it is up, whatever else went wrong
        if not download.bad and stream_error is None:
            runtime.throttle.success()
    errors = dict(download.bad)
    if stream_error is not None:
        errors.update({ref.instance_uid: stream_error for ref in download.remaining(refs)})
    result.failed += apply_policy(runtime, message, errors, download.tries, codes, plan)


def raise_short(runtime: SourceRuntime, missing: list[InstanceReference]) -> None:
    """A downloader that returned fewer instances than asked without raising broke its contract; the instances it
    did not deliver are not found, never silently missing."""
    raise NotFoundError(
        f"the server answered without {len(missing)} of the instances asked for",
        source=runtime.name,
        reference=missing[0],
    )
