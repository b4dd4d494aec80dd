"""The watchdog: the engine's liveness guarantee, kept without a human.

The invariant (docs/engine.md, "Liveness"): every instance of a job is at all times

- **pending** with a message that will deliver it (in the broker, or parked in ``trolley:delayed`` until due),
- **running** under a live lease (its fetch's heartbeat renews it), or
- **terminal** (done, skipped, failed).

Handlers keep it on every path they know (settle before publish; everything after a claim caught and put back). The
watchdog restores it after anything they could not see: a worker killed with messages in hand, a message acked by a
time limit, a Redis restarted from its append-only file without its last writes, a broker that dropped a publish,
a scheduler that died between taking a message off the delayed set and sending it. It needs no visibility timeout to
decide anything: the ledger knows what is pending and whose lease lapsed.

Each tick, one worker on one host (a Redis lock) does three things:

1. moves delayed messages that are due to the broker (:meth:`DeferringPublisher.publish_due`);
2. for every active job with no activity (claim, heartbeat, settle, expansion) for ``stall_seconds`` past the time
   its deferred work was due, re-publishes its pending instances, lapsed leases and unexpanded rows (a duplicate is
   harmless: the ledger's claim decides who fetches); a job whose producer died before it said "all rows queued" is
   told so, so that it can end. While some job moves and the broker's queues hold messages, a quiet job is only
   waiting its turn behind them, and is left alone;
3. for every job that ended ``stall_seconds`` ago without its report on disk, asks for the report again
   (``trolley.finalize``).

Why a thread in every worker's main process, and not Celery beat: beat is one more service to deploy, and the one an
overnight export would silently lack; a thread in each worker needs nothing new, works the same in embedded mode and
on many hosts, and survives the death of any worker (the lock lapses, another worker's thread takes over).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from trolley_tasks.engine.context import EngineContext
from trolley_tasks.engine.dispatch import republish
from trolley_tasks.engine.ledger.reading import as_text
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.scheduler import DeferringPublisher

log = logging.getLogger("trolley.engine.watchdog")

LOCK_KEY = "trolley:watchdog:lock"


@dataclass
class SweepResult:
    """What one tick did, for logs and tests."""

    swept: bool = False
    due: int = 0
    republished: dict[str, int] = field(default_factory=dict)
    finalize: list[str] = field(default_factory=list)


class Watchdog:
    """One sweeper over a context's ledger and publisher (see the module docstring).

    Parameters
    ----------
    ctx
        An engine context whose publisher is a :class:`DeferringPublisher` (what ``build_context`` makes).
    stall_seconds, interval
        ``[engine] stall_seconds`` and ``sweep_interval``.
    """

    def __init__(
        self,
        ctx: EngineContext,
        *,
        stall_seconds: float,
        interval: float,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        if not isinstance(ctx.publisher, DeferringPublisher):
            raise TypeError("the watchdog needs the context's DeferringPublisher")
        self.ctx = ctx
        self.deferred: DeferringPublisher = ctx.publisher
        self.stall_seconds = stall_seconds
        self.interval = interval
        self.backlog = backlog
        self.token = uuid.uuid4().hex

    def _lock(self) -> bool:
        """Hold the sweep lock for about three ticks (renewed by the holder each tick)."""
        r = self.ctx.ledger.r
        ttl = max(1, int(self.interval * 3 * 1000))
        if r.set(LOCK_KEY, self.token, nx=True, px=ttl):
            return True
        if as_text(r.get(LOCK_KEY) or b"") == self.token:
            r.pexpire(LOCK_KEY, ttl)
            return True
        return False

    def tick(self) -> SweepResult:
        result = SweepResult()
        if not self._lock():
            return result
        result.swept = True
        result.due = self.deferred.publish_due()
        ledger = self.ctx.ledger
        seconds, micros = ledger.r.time()
        now = seconds + micros / 1e6
        jobs = {job: ledger.job_fields(job) for job in ledger.job_ids()}
        active = {job: f for job, f in jobs.items() if f.get("state") in (JobState.EXPANDING, JobState.RUNNING)}
        # A job may be quiet only because its messages wait behind another job's in the broker: while the workers
        # are busy and the queues hold messages, that is no stall (reviving it would only pile up duplicates).
        busy = any(now - _quiet_since(f) < self.stall_seconds for f in active.values()) and self.backlog() > 0
        for job, fields in jobs.items():
            state = fields.get("state", "")
            if job in active:
                quiet_since = _quiet_since(fields)
                if busy or now - quiet_since < self.stall_seconds:
                    continue
                if fields.get("producer_done") != "1" and ledger.producer_done(job):
                    log.warning("job %s: its producer stopped before it said every row was queued", job)
                    self.ctx.publisher.finalize(job)
                    result.finalize.append(job)
                    continue
                sent = republish(self.ctx, job)
                ledger.touch(job)
                result.republished[job] = sent
                log.warning(
                    "job %s: no activity for %.0f s; re-published its pending work (%d messages)",
                    job,
                    now - quiet_since,
                    sent,
                )
            elif state in (JobState.DONE.value, JobState.DONE_WITH_FAILURES.value, JobState.CANCELLED.value):
                finished = float(fields.get("finished_at") or 0)
                asked = float(fields.get("finalize_asked_at") or 0)
                if not fields.get("reported_at") and now - max(finished, asked) > self.stall_seconds:
                    ledger.asked_to_finalize(job)
                    self.ctx.publisher.finalize(job)
                    result.finalize.append(job)
        return result


def _quiet_since(fields: dict[str, str]) -> float:
    """When the job last moved, or the time its deferred work is due, whichever is later."""
    return max(float(fields.get(name) or 0) for name in ("updated_at", "wait_until", "created_at"))


class WatchdogThread:
    """A :class:`Watchdog` ticking on a daemon thread, with ``also`` (per-host chores, such as taking over the
    C-MOVE receiver) run every tick whether or not this host holds the sweep lock."""

    def __init__(self, watchdog: Watchdog, also: Callable[[], object] = lambda: None) -> None:
        self.watchdog = watchdog
        self.also = also
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trolley-watchdog", daemon=True)

    def start(self) -> WatchdogThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.watchdog.interval):
            try:
                self.also()
                result = self.watchdog.tick()
                if result.due or result.republished or result.finalize:
                    log.info("watchdog: %s", result)
            except Exception:  # Redis or the broker away for a moment: the next tick tries again
                log.warning("watchdog tick failed; trying again in %.0f s", self.watchdog.interval, exc_info=True)
