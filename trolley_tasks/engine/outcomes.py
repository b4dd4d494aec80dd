"""What a task does with what happened: the retry table applied per instance, host conditions, and the order of
the writes that keep the liveness invariant (settle, then pause, then publish).

A fetch ends with a :class:`Plan`: each claimed instance settled (done, skipped, failed, or back to pending), at
most one re-queue of the instances to retry (parked in Redis when it has a delay), and perhaps a pause of the job
with a reason a person can act on. :func:`carry_out` writes it in the only safe order: the ledger first, so that a
message never arrives for an instance the ledger still shows running under our lease (it would be dropped as held,
and the instance would wait for the watchdog), and nothing is published for a job that the same plan paused.

**Host conditions** are failures of this worker host, not of the PACS or the instance: a full disk, a read-only or
unwritable output, a profile or secret missing on this host. Failing instances for them would fail the whole export
in minutes; retrying would spin. They pause the job, put the instances back without spending an attempt, and say
where and why (``trolley-tasks resume`` after the fix).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from celery.exceptions import SoftTimeLimitExceeded

from trolley_tasks.core import InstanceReference
from trolley_tasks.engine.breaker import TRIPPING
from trolley_tasks.engine.context import RECEIVER_WAIT, EngineContext, SourceRuntime
from trolley_tasks.engine.heartbeat import LeaseLost
from trolley_tasks.engine.ledger import ClaimCode, Outcome, Settled
from trolley_tasks.engine.messages import FetchMessage
from trolley_tasks.engine.models import Failure
from trolley_tasks.engine.policy import Action
from trolley_tasks.errors import ConfigurationError, ErrorClass, PacsTimeoutError, TrolleyError, error_class_of

log = logging.getLogger("trolley.engine")

HOST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
"""``OSError`` numbers that say "this host cannot write the export" rather than "this instance is bad"."""


def host_condition(error: BaseException) -> str:
    """A reason to pause the job when ``error`` is a condition of this worker host; '' otherwise."""
    host = socket.gethostname()
    if isinstance(error, OSError) and error.errno in HOST_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        return f"host {host}: {error.strerror}{where}; fix it, then run trolley-tasks resume"
    if isinstance(error, ConfigurationError):
        return f"host {host}: {error.message}; fix this worker's configuration, then run trolley-tasks resume"
    return ""


def as_engine_error(error: BaseException) -> BaseException:
    """Errors the task runtime raises, in the error tree: a soft time limit is a timeout of this request."""
    if isinstance(error, SoftTimeLimitExceeded):
        return PacsTimeoutError("the task ran past its time limit ([engine] task_time_limit)")
    return error


@dataclass
class Plan:
    """What one task decided: the ledger writes, the re-queue and the pause, carried out by :func:`carry_out`."""

    probe: bool = False
    """This task is the probe of a held source: its tripping errors spend one attempt (see :mod:`.breaker`)."""
    settled: list[Settled] = field(default_factory=list)
    requeue: list[str] = field(default_factory=list)
    delay: float = 0.0
    pause: str = ""
    errors: Counter[str] = field(default_factory=Counter)
    """Error class -> instances, for one log line per class (never one line per instance)."""
    first_error: dict[str, str] = field(default_factory=dict)

    def settled_uids(self) -> set[str]:
        return {item.instance_uid for item in self.settled}

    def back_to_pending(self, uids: list[str], codes: dict[str, tuple[ClaimCode, int, float]]) -> None:
        """These go back untouched: no attempt spent (the source was held, the host failed, a lease was lost)."""
        for uid in uids:
            self.settled.append(Settled(uid, Outcome.PENDING, codes[uid][1], codes[uid][2]))

    def note(self, error_class: ErrorClass, error: BaseException) -> None:
        self.errors[error_class.value] += 1
        text = error.message if isinstance(error, TrolleyError) else f"{type(error).__name__}: {error}"
        self.first_error.setdefault(error_class.value, text[:200])  # one example per class; the report has them all

    def summary(self) -> str:
        """``server-error x10 (HTTP 500 ...); not-found x1 (...)``: readable whatever the batch size."""
        return "; ".join(f"{name} x{count} ({self.first_error[name]})" for name, count in self.errors.items())


def apply_policy(
    runtime: SourceRuntime,
    message: FetchMessage,
    errors: dict[str, BaseException],
    tries: dict[str, int],
    codes: dict[str, tuple[ClaimCode, int, float]],
    plan: Plan,
) -> int:
    """Turn each failed instance into fail / re-queue / pause, per the retry table and the source's breaker.

    A tripping error (transient, timeout, busy) is reported to the source's breaker once per batch; when that opens
    it (or it held already), the instances go back to pending without spending an attempt (the probe of a held
    source spends one), to be retried when the source is let through again. Returns how many failed for good.
    """
    if errors and runtime.receiver_missing():
        # a C-MOVE whose receiver died under it (0xC000, failed sub-operations): our host's fault, no attempt spent
        plan.back_to_pending(list(errors), codes)
        plan.requeue.extend(errors)
        plan.delay = max(plan.delay, RECEIVER_WAIT)
        return 0
    failed = 0
    now = time.time()
    shrunk = False
    held = _report_to_breaker(runtime, errors.values())
    for uid, raw in errors.items():
        error = as_engine_error(raw)
        ref = InstanceReference(message.study, message.series, uid)
        prior, busy_at = codes[uid][1], codes[uid][2]
        error_class, decision = runtime.policy.decide(error)
        plan.note(error_class, error)
        reason = host_condition(error)
        if reason or decision.action is Action.PAUSE_JOB:
            plan.pause = plan.pause or reason or f"{error_class.value}: {Failure.of(error, prior).message}"
            plan.back_to_pending([uid], codes)
            continue
        retry_after = error.retry_after if isinstance(error, TrolleyError) else None
        if decision.shrink_concurrency and not shrunk:
            runtime.throttle.busy()
            shrunk = True
        if held > 0 and decision.action is Action.RETRY:
            attempts = prior + 1 if plan.probe else prior  # the source is held: only its probe spends a try
            delay = held
        else:
            attempts = prior + tries.get(uid, 1)
            if decision.budget_interval is not None:
                counted = now - busy_at >= decision.budget_interval
                attempts = prior + (1 if counted else 0)
                busy_at = now if counted else busy_at
            delay = decision.delay(attempts, retry_after)
        if decision.action is Action.RETRY and not decision.exhausted(attempts):
            plan.settled.append(Settled(uid, Outcome.PENDING, attempts, busy_at))
            plan.requeue.append(uid)
            plan.delay = max(plan.delay, delay)
            continue
        failure = Failure.of(
            error, attempts, study_uid=ref.study_uid, series_uid=ref.series_uid, instance_uid=ref.instance_uid
        )
        plan.settled.append(Settled(uid, Outcome.FAILED, attempts, busy_at, failure=failure))
        failed += 1
    return failed


def _report_to_breaker(runtime: SourceRuntime, errors: Iterable[BaseException]) -> float:
    """Tell the source's breaker about the batch's first tripping error (once per batch: one failed request, not
    one per instance it carried). Returns how long the source is now held."""
    for raw in errors:
        error = as_engine_error(raw)
        error_class = error_class_of(error)
        if error_class in TRIPPING:
            retry_after = error.retry_after if isinstance(error, TrolleyError) else None
            return runtime.breaker.failure(error_class, retry_after)
    return 0.0


def rescue(
    error: BaseException,
    runtime: SourceRuntime,
    message: FetchMessage,
    claimed: list[str],
    tries: dict[str, int],
    codes: dict[str, tuple[ClaimCode, int, float]],
    plan: Plan,
    redact: Callable[[str], str],
) -> int:
    """Something escaped the fetch after the claim (a time limit, a full disk, a bug, a lost lease): every claimed
    instance not yet settled goes through the policy (or back to pending), so none stays running with no message.
    Returns how many failed for good. ``redact`` readies text for the log (:meth:`EngineContext.redact`)."""
    settled = plan.settled_uids()
    rest = [uid for uid in claimed if uid not in settled]
    if isinstance(error, LeaseLost) or not isinstance(error, Exception):
        plan.back_to_pending(rest, codes)  # another holder, or the worker shutting down: nothing was tried
        plan.requeue.extend(rest)
        return 0
    log.warning("job %s series %s: %s", message.job, redact(message.series), redact(f"{type(error).__name__}: {error}"))
    return apply_policy(runtime, message, {uid: error for uid in rest}, tries, codes, plan)


def carry_out(ctx: EngineContext, message: FetchMessage, plan: Plan) -> bool:
    """Pause (if asked), settle, then re-queue: in that order (see the module docstring). Returns True when the
    settle completed the job (the caller asks for its report)."""
    if plan.pause and ctx.ledger.pause(message.job, plan.pause):
        log.warning("job %s paused: %s", message.job, plan.pause)
    finalized = ctx.ledger.settle(message.job, message.series, plan.settled)
    if plan.requeue and not plan.pause:
        ctx.publisher.fetch(message.with_instances(plan.requeue), countdown=plan.delay)
    if plan.errors:
        redact = functools.partial(ctx.redact, message.job)
        log.warning("job %s series %s: %s", message.job, redact(message.series), redact(plan.summary()))
    return finalized
