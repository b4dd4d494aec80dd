"""The heartbeat of a running task: its claims and its concurrency slot stay alive exactly as long as it does.

A claim (``running`` in the ledger) and a throttle slot are leases: a worker that dies stops renewing them and they
lapse, so nothing leaks. A worker that lives must never lose them, whatever the protocol is doing: a C-MOVE waiting
for the PACS's sub-operations, a slow first byte, a QIDO expansion of a large study. So a small thread renews both
every third of the lease while the task runs, instead of the download loop renewing them when bytes happen to
arrive. Each renewal also moves the job's activity clock (``updated_at``), which is what the watchdog reads.

A renewal that finds the lease gone (the ledger gave the instances to another fetch after a lapse, or the slot to
another worker) marks the heartbeat lost; the task checks :meth:`Heartbeat.check` between instances and stops, so
the PACS never sees more than ``max_concurrency`` requests and no instance is fetched by two holders for long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType

from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.throttle import Slot

log = logging.getLogger("trolley.engine.heartbeat")


class LeaseLost(Exception):
    """This task's claim or slot lapsed and may be someone else's now: stop, settle what is stored, go."""


class Heartbeat:
    """Renew a claim (``lease`` over ``uids`` of one series) and any slot :meth:`watch` is given, every
    ``lease_seconds / 3``, on a daemon thread, for the life of the ``with`` block.

    With no ``uids`` (an expansion) it only touches the job's activity clock and renews the slot.
    """

    def __init__(
        self,
        ledger: Ledger,
        job: str,
        lease_seconds: float,
        series: str = "",
        lease: str = "",
        uids: Sequence[str] = (),
    ) -> None:
        self.ledger = ledger
        self.job = job
        self.series = series
        self.lease = lease
        self.uids = list(uids)
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._slots: list[Slot] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def watch(self, slot: Slot) -> None:
        """Keep ``slot`` alive too (until the block ends; a released slot simply fails to renew, harmlessly)."""
        with self._lock:
            self._slots.append(slot)

    def settled(self, uids: Sequence[str]) -> None:
        """Stop renewing these (they were settled)."""
        done = set(uids)
        with self._lock:
            self.uids = [uid for uid in self.uids if uid not in done]

    def check(self) -> None:
        """Raise :class:`LeaseLost` when a renewal found the claim or the slot gone."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job}: the lease of this task lapsed; another worker may hold its work")

    def beat(self) -> None:
        """One renewal (the thread's body; public for tests that drive time themselves)."""
        with self._lock:
            uids, slots = list(self.uids), list(self._slots)
        if uids:
            self.lease, whole = self.ledger.renew(self.job, self.series, self.lease, uids, self.lease_seconds)
            if not whole:
                self.lost.set()
        else:
            self.ledger.touch(self.job)
        for slot in slots:
            if not slot.renew():
                self.lost.set()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.beat()
            except Exception:  # a Redis blip: the next beat tries again, well within the lease
                log.warning("heartbeat of job %s failed; retrying", self.job, exc_info=True)
