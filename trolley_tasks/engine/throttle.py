"""A global throttle per source profile, shared by every worker process on every host through Redis.

Three independent limits, each optional except the first:

- **Concurrency** (``max_concurrency``): a Redis semaphore, a sorted set of lease tokens scored by their expiry.
  A fetch (one request or one association) holds a slot; a worker that is killed stops renewing its lease, and the
  slot frees itself when the lease lapses, so no slot ever leaks.
- **Rate** (``rate_limit = "50/s"``): a token bucket in a Redis hash, one token per instance requested. It bounds
  what a PACS sees per second whatever the number of workers.
- **Window** (``window = "20:00-06:00"``): fetches outside the window are not started; the engine re-queues them
  with a countdown so that a held instance does not occupy a worker. The window is in the worker host's local time.

**AIMD.** When the server says it is busy (HTTP 429/503, DIMSE 0xA7xx), the effective concurrency is halved (at most
once per ``decrease_interval``, so that one overload seen by eight workers halves it once, not eight times). Each
successful fetch may add one slot back, at most once per ``increase_interval``, up to ``max_concurrency``: TCP's
additive-increase/multiplicative-decrease, which converges on what the server can take.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dtime

import redis

from trolley_tasks.errors import ConfigurationError
from trolley_tasks.profiles import parse_rate, parse_window

_SEMAPHORE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max = tonumber(ARGV[3])
local limit = tonumber(redis.call('HGET', KEYS[2], 'limit') or max)
if limit > max then limit = max end
if limit < 1 then limit = 1 end
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""

_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""

_BUCKET_LUA = """
-- KEYS: bucket hash. ARGV: rate per second, burst, tokens wanted. Returns seconds to wait (0: taken).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(h[1]) or burst
local ts = tonumber(h[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate)
local wait = 0
if tokens >= want then tokens = tokens - want else wait = (want - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""

_AIMD_LUA = """
-- KEYS: state hash. ARGV: direction (down/up), max, interval. Returns the limit after the call.
-- A decrease waits interval after the last decrease; an increase waits interval after any change.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local max = tonumber(ARGV[2])
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or max)
if limit > max then limit = max end
local down_at = tonumber(redis.call('HGET', KEYS[1], 'down_at') or 0)
local up_at = tonumber(redis.call('HGET', KEYS[1], 'up_at') or 0)
if ARGV[1] == 'down' then
  if now - down_at < tonumber(ARGV[3]) then return limit end
  limit = math.max(1, math.floor(limit / 2))
  redis.call('HSET', KEYS[1], 'limit', limit, 'down_at', tostring(now))
else
  if limit >= max or now - math.max(down_at, up_at) < tonumber(ARGV[3]) then return limit end
  limit = limit + 1
  redis.call('HSET', KEYS[1], 'limit', limit, 'up_at', tostring(now))
end
return limit
"""


@dataclass(frozen=True)
class Window:
    """Allowed hours ``start-end`` in local time; ``end <= start`` spans midnight (``20:00-06:00``)."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, value: str) -> Window:
        """``"HH:MM-HH:MM"`` (see :func:`trolley_tasks.profiles.parse_window`); ConfigurationError when malformed."""
        try:
            start, end = parse_window(value)
        except ValueError as exc:
            raise ConfigurationError(f"window: {exc}") from None
        return cls(start, end)

    def seconds_until_open(self, now: datetime | None = None) -> float:
        """0 when ``now`` (local time by default) is inside the window, else the seconds until it opens."""
        now = now or datetime.now().astimezone()
        t = now.time().replace(tzinfo=None)
        inside = self.start <= t < self.end if self.start < self.end else (t >= self.start or t < self.end)
        if inside:
            return 0.0
        opens = now.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opens <= now:
            opens += timedelta(days=1)
        return (opens - now).total_seconds()


class ThrottleBusy(Exception):
    """No concurrency slot came free in time; the caller re-queues instead of holding a worker."""


class Throttle:
    """The throttle of one source profile.

    Parameters
    ----------
    client
        The ledger's Redis.
    source
        The profile name; keys are ``trolley:throttle:<source>:*``.
    max_concurrency
        Requests or associations at once across all workers.
    rate_limit
        ``"50/s"``-style instances per second, or None.
    window
        ``"HH:MM-HH:MM"`` allowed hours, or None.
    lease_seconds
        How long a slot lives without renewal; the task's heartbeat renews it while the task runs.
    """

    decrease_interval = 5.0
    increase_interval = 10.0

    def __init__(
        self,
        client: redis.Redis,
        source: str,
        *,
        max_concurrency: int,
        rate_limit: str | None = None,
        window: str | None = None,
        lease_seconds: float = 120.0,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigurationError(f"sources.{source}.max_concurrency must be at least 1, got {max_concurrency}")
        self.r = client
        self.source = source
        self.max_concurrency = max_concurrency
        try:
            self.rate = parse_rate(rate_limit) if rate_limit else None
        except ValueError as exc:
            raise ConfigurationError(f"sources.{source}.rate_limit: {exc}") from None
        self.window = Window.parse(window) if window else None
        self.lease_seconds = lease_seconds
        base = f"trolley:throttle:{source}"
        self.sem_key, self.state_key, self.bucket_key = f"{base}:slots", f"{base}:aimd", f"{base}:bucket"
        self.waits_key = f"{base}:waits"
        self._acquire = client.register_script(_SEMAPHORE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._bucket = client.register_script(_BUCKET_LUA)
        self._aimd = client.register_script(_AIMD_LUA)

    def seconds_until_open(self) -> float:
        return self.window.seconds_until_open() if self.window else 0.0

    def try_acquire(self) -> str | None:
        """A slot token, or None when all slots are taken."""
        token = uuid.uuid4().hex
        keys = [self.sem_key, self.state_key]
        if self._acquire(keys=keys, args=[token, self.lease_seconds, self.max_concurrency]):
            return token
        return None

    def renew(self, token: str) -> bool:
        """Extend a slot's lease; False when it had lapsed (the slot may now be someone else's)."""
        return bool(self._renew(keys=[self.sem_key], args=[token, self.lease_seconds]))

    def release(self, token: str) -> None:
        self.r.zrem(self.sem_key, token)

    @contextmanager
    def slot(self, max_wait: float, poll: float = 0.02) -> Iterator[Slot]:
        """Hold one concurrency slot for the block; :class:`ThrottleBusy` when none came free in ``max_wait``."""
        started = time.monotonic()
        deadline = started + max_wait
        delay = poll
        while (token := self.try_acquire()) is None:
            if time.monotonic() >= deadline:
                self._count_wait("slot", time.monotonic() - started)
                raise ThrottleBusy(f"no free slot for source {self.source} within {max_wait:g}s")
            time.sleep(delay)
            delay = min(0.25, delay * 1.5)
        if delay > poll:  # waited at least once: the cap, not the PACS, set the pace
            self._count_wait("slot", time.monotonic() - started)
        held = Slot(self, token)
        try:
            yield held
        finally:
            held.released = True
            self.release(token)

    def take(self, n: int = 1) -> None:
        """Wait until the token bucket gives ``n`` tokens (no-op without a rate limit). Burst: one second's worth."""
        if self.rate is None:
            return
        burst = max(float(n), self.rate)
        started = time.monotonic()
        waited = False
        while True:
            wait = float(self._bucket(keys=[self.bucket_key], args=[self.rate, burst, n]))
            if wait <= 0:
                if waited:
                    self._count_wait("rate", time.monotonic() - started)
                return
            waited = True
            time.sleep(min(wait, 5.0))

    def _count_wait(self, kind: str, seconds: float) -> None:
        """Count one wait for a slot or for rate tokens, and its length (``trolley:throttle:<source>:waits``): how
        often, and how long, the cap held work back (the metrics endpoint exports them)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(self.waits_key, kind, 1)
        pipe.hincrbyfloat(self.waits_key, f"{kind}_seconds", seconds)
        pipe.execute()

    def waits(self) -> dict[str, float]:
        """``{"slot": n, "slot_seconds": s, "rate": n, "rate_seconds": s}``: the waits counted so far."""
        raw = self.r.hgetall(self.waits_key)
        found = {k.decode() if isinstance(k, bytes) else str(k): float(v) for k, v in raw.items()}
        return {key: found.get(key, 0.0) for key in ("slot", "slot_seconds", "rate", "rate_seconds")}

    def busy(self) -> int:
        """The server said it is busy: halve the effective concurrency. Returns the new limit."""
        return int(self._aimd(keys=[self.state_key], args=["down", self.max_concurrency, self.decrease_interval]))

    def success(self) -> int:
        """A fetch went well: maybe add one slot back. Returns the limit."""
        return int(self._aimd(keys=[self.state_key], args=["up", self.max_concurrency, self.increase_interval]))

    def effective_limit(self) -> int:
        value = self.r.hget(self.state_key, "limit")
        return min(self.max_concurrency, int(value)) if value is not None else self.max_concurrency

    def in_use(self) -> int:
        seconds, micros = self.r.time()
        return int(self.r.zcount(self.sem_key, seconds + micros / 1e6, "+inf"))


class Slot:
    """A held concurrency slot. The task's heartbeat (:mod:`~trolley_tasks.engine.heartbeat`) renews it."""

    def __init__(self, throttle: Throttle, token: str) -> None:
        self.throttle = throttle
        self.token = token
        self.released = False

    def renew(self) -> bool:
        """Extend the slot's lease; False when it had lapsed (and may be another worker's now). A slot given back
        has nothing to renew."""
        return self.released or self.throttle.renew(self.token)
