"""A circuit breaker per source: patience measured in time, not in attempts.

A PACS that reboots, or a network that drops for a minute, fails every request made meanwhile. Spending each
instance's retry budget on that would fail thousands of instances that a little patience saves, and every queued
message would burn its own budget in turn. So the source, not the instance, absorbs an outage:

- after ``threshold`` consecutive transient, timeout or busy errors (from any worker on any host) the breaker
  **opens**: the source is held like a closed window, for ``backoff`` seconds (doubling from 5 s up to ``max_hold``);
  messages that arrive for it are parked in Redis until then (:mod:`~trolley_tasks.engine.scheduler`), no instance
  is claimed and no attempt is counted;
- when the hold ends, ONE fetch or search is let through as a **probe** (half-open); others keep waiting. A probe
  makes one try (no quick retries) and spends one attempt, so that one instance that always fails cannot hold its
  source for ever: it fails after its budget of probes, and the source goes on;
- a success anywhere closes the breaker; a failed probe opens it again with a doubled hold;
- a server's ``Retry-After`` opens the breaker for exactly that long, however long it is (RFC 9110 10.2.3): the
  whole source waits, not just the one instance that was told.

Errors that open the breaker, or arrive while it holds, count no attempt (:mod:`~trolley_tasks.engine.outcomes`),
so an outage of any length costs an instance the attempts it spent before the breaker tripped plus the probes it
happened to carry; parked work comes back in the order it was parked, so the probes rotate over the pending batches.
"""

from __future__ import annotations

import redis

from trolley_tasks.errors import ErrorClass

TRIPPING = frozenset({ErrorClass.TRANSIENT, ErrorClass.TIMEOUT, ErrorClass.SERVER_BUSY})
"""The error classes that say "the source is unwell", as opposed to "this instance is"."""
FIRST_HOLD = 5.0

_GATE = """
-- KEYS: breaker hash. ARGV: probe lease seconds.
-- Returns {seconds to hold (0: go), 1 when this caller is the probe of a source that was held}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'open_until', 'probe_until', 'backoff')
local open_until, probe_until, backoff = tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0
if open_until > now then return {tostring(open_until - now), 0} end
if backoff == 0 then return {'0', 0} end
if probe_until > now then return {tostring(math.min(probe_until - now, 5)), 0} end
redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[1])))
return {'0', 1}
"""

_FAIL = """
-- KEYS: breaker hash. ARGV: threshold, first hold, max hold, retry-after (0: none).
-- Returns seconds the source is now held (0: still closed).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local backoff = tonumber(redis.call('HGET', KEYS[1], 'backoff') or 0) or 0
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or 0) or 0
local hold = 0
if failures >= tonumber(ARGV[1]) then
  if backoff == 0 then backoff = tonumber(ARGV[2]) else backoff = math.min(tonumber(ARGV[3]), backoff * 2) end
  hold = backoff
end
local retry_after = tonumber(ARGV[4])
if retry_after > hold then hold = retry_after; if backoff == 0 then backoff = tonumber(ARGV[2]) end end
if hold > 0 then
  open_until = math.max(open_until, now + hold)
  redis.call('HSET', KEYS[1], 'open_until', tostring(open_until), 'backoff', tostring(backoff), 'probe_until', '0')
  redis.call('EXPIRE', KEYS[1], 86400)
  return tostring(open_until - now)
end
return '0'
"""


_RELEASE = """
-- KEYS: breaker hash. The probe ended without telling (no request was made, or no answer judged the source):
-- let the next caller probe. Never creates the key (a success deleted it).
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'probe_until', '0') end
return 1
"""


class Breaker:
    """The breaker of one source profile, shared by every worker through Redis.

    Parameters
    ----------
    client
        The ledger's Redis.
    source
        The profile name; the key is ``trolley:breaker:<source>``.
    threshold
        Consecutive tripping errors that open the breaker.
    max_hold
        The longest hold between probes, in seconds (a ``Retry-After`` may ask for longer, and gets it).
    probe_seconds
        How long one probe may take before another is let through.
    """

    def __init__(
        self, client: redis.Redis, source: str, *, threshold: int, max_hold: float, probe_seconds: float
    ) -> None:
        self.r = client
        self.key = f"trolley:breaker:{source}"
        self.threshold = threshold
        self.max_hold = max_hold
        self.probe_seconds = probe_seconds
        self._gate = client.register_script(_GATE)
        self._fail = client.register_script(_FAIL)
        self._release = client.register_script(_RELEASE)

    def gate(self) -> tuple[float, bool]:
        """(0, False) when the source is closed; (0, True) when this caller is the probe of a held source; else
        (seconds to hold the work, False)."""
        hold, probe = self._gate(keys=[self.key], args=[self.probe_seconds])
        return float(hold), bool(int(probe))

    def failure(self, error_class: ErrorClass, retry_after: float | None = None) -> float:
        """Record a tripping error; returns how long the source is now held (0: not held)."""
        if error_class not in TRIPPING:
            return 0.0
        args = [self.threshold, FIRST_HOLD, self.max_hold, retry_after or 0]
        return float(self._fail(keys=[self.key], args=args))

    def release_probe(self) -> None:
        """The probe this caller was given ended without a verdict (no slot, nothing to fetch, a 404): the next
        caller becomes the probe, instead of every caller waiting for the probe's lease to lapse."""
        self._release(keys=[self.key])

    def success(self) -> None:
        """A request went well: close the breaker (one round trip, and only when it is not already closed)."""
        if self.r.exists(self.key):
            self.r.delete(self.key)

    def state(self) -> str:
        """``closed``, ``open`` (holding) or ``half-open`` (waiting for a probe to tell), for status and metrics."""
        open_until, backoff = self.r.hmget(self.key, "open_until", "backoff")
        if not backoff or float(backoff) == 0:
            return "closed"
        seconds, micros = self.r.time()
        return "open" if float(open_until or 0) > seconds + micros / 1e6 else "half-open"
