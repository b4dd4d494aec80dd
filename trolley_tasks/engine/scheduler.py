"""Delayed work lives in Redis, not in worker memory: retries, window holds and held sources.

Celery's countdown makes a message an ETA task that a worker reserves at once and keeps in its memory, outside the
prefetch limit, until it is due: a window that opens on a thousand held batches would find them all in one worker, and
those still held when the broker's visibility timeout passes are delivered a second time while the first copy is
still waiting. So the engine never uses countdowns. A deferred message goes into one sorted set, ``trolley:delayed``,
scored by when it is due; the watchdog (:mod:`~trolley_tasks.engine.watchdog`) moves due messages to the broker.

A message taken off the set and lost before it reached the broker (a crash between the two) is not lost work: its
instances are still pending in the ledger, and the watchdog re-publishes a stalled job's pending work.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import redis

from trolley_tasks.engine.messages import FetchMessage, Publisher

DELAYED_KEY = "trolley:delayed"

_POP_DUE = """
-- KEYS: delayed zset. ARGV: now, limit. Removes and returns up to limit members due by now.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""


class DeferringPublisher:
    """A :class:`~trolley_tasks.engine.context.Publisher` that sends now-work to ``inner`` and parks later-work in
    Redis (``countdown`` > 0), telling the ledger that the job waits until then (``wait_until``)."""

    def __init__(self, inner: Publisher, client: redis.Redis, wait_until: Callable[[str, float], None]) -> None:
        self.inner = inner
        self.r = client
        self.wait_until = wait_until
        self._pop = client.register_script(_POP_DUE)

    def _park(self, job: str, kind: str, kwargs: dict[str, Any], countdown: float) -> None:
        seconds, micros = self.r.time()
        due = seconds + micros / 1e6 + countdown
        member = json.dumps({"id": uuid.uuid4().hex, "kind": kind, "kwargs": kwargs}, sort_keys=True)
        self.r.zadd(DELAYED_KEY, {member: due})
        self.wait_until(job, due)

    def fetch(self, message: FetchMessage, countdown: float = 0.0) -> None:
        if countdown > 0:
            self._park(message.job, "fetch", message.kwargs(), countdown)
        else:
            self.inner.fetch(message)

    def expand(self, job: str, source: str, row: str, attempt: int = 1, countdown: float = 0.0) -> None:
        if countdown > 0:
            kwargs = {"job": job, "source": source, "row": row, "attempt": attempt}
            self._park(job, "expand", kwargs, countdown)
        else:
            self.inner.expand(job, source, row, attempt)

    def finalize(self, job: str) -> None:
        self.inner.finalize(job)

    def publish_due(self, limit: int = 500) -> int:
        """Move every deferred message that is due to the broker; return how many."""
        sent = 0
        while True:
            seconds, micros = self.r.time()
            batch = self._pop(keys=[DELAYED_KEY], args=[seconds + micros / 1e6, limit])
            for raw in batch:
                item = json.loads(raw)
                kwargs = item["kwargs"]
                if item["kind"] == "fetch":
                    kwargs["instances"] = tuple(kwargs["instances"])
                    self.inner.fetch(FetchMessage(**kwargs))
                else:
                    self.inner.expand(**kwargs)
                sent += 1
            if len(batch) < limit:
                return sent

    def pending(self) -> int:
        """Deferred messages not yet due (or due and not yet moved)."""
        return int(self.r.zcard(DELAYED_KEY))
