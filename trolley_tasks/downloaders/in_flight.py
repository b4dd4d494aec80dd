"""Several requests in flight, answers handed back in the order asked: for protocols of one request per instance.

A WADO-URI batch asks for one instance per request. Sent one after another, each request waits for the one before
it, and two worker processes keep two requests in flight where the reference client keeps eight (docs/performance.md).
:func:`in_order` keeps up to ``limit`` requests running on a small thread pool, over the downloader's one session
(requests' connection pool keeps up to 10 connections per host alive between batches), and hands each answer back
in the order of the references, so the caller's contract does not change:

- the caller gets one answer at a time, and the next request is sent only once it asks for the next answer: at most
  ``limit`` answers exist at once, the one the caller holds included;
- a request's exception is raised when the caller reaches that reference, never earlier, so what was delivered
  before it is the same as when the requests ran one after another;
- when the caller stops early (an error, or a closed generator), requests not yet started are cancelled, and the
  answers of those already running are waited for and released (their connections closed).

**Staying within a global cap.** The first request runs on the caller's own permission (the engine holds one
concurrency slot of the source per batch). Every further request at once needs a token from ``gate``, a
:class:`RequestGate` (the engine's throttle is one: ``try_acquire`` and ``release``); when it gives none, the batch
goes on with fewer requests at once, down to one. A token is passed on to the next request while it is younger than
``TOKEN_REUSE_SECONDS`` (saving a round trip to the gate per request) and given back otherwise, and always at the end.
Without a gate, ``limit`` alone bounds the requests: for a caller that answers to no shared cap.

Everything the caller does with an answer (storage, the ledger) stays in the caller's thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
R = TypeVar("R")

TOKEN_REUSE_SECONDS = 5.0
"""A gate's token is handed to the next request only while younger than this: well inside any lease the gate
gives (the engine's throttle leases a slot for its lease time, 90 s by default, and does not renew extra ones)."""


@runtime_checkable
class RequestGate(Protocol):
    """Room for one more request at once, under a cap shared with others (``engine.throttle.Throttle`` is one)."""

    def try_acquire(self) -> str | None:
        """A token for one more request, or None when the cap is reached now."""
        ...

    def release(self, token: str) -> None:
        """Give a token back."""
        ...


@dataclass
class _Lease:
    token: str | None  # None: the caller's own permission, or no gate at all
    since: float


class _Leases:
    """The permissions of one batch's requests: the caller's own first, then the gate's tokens."""

    def __init__(self, gate: RequestGate | None) -> None:
        self.gate = gate
        self.spare: list[_Lease] = [_Lease(None, 0.0)]

    def take(self) -> _Lease | None:
        now = time.monotonic()
        while self.spare:
            lease = self.spare.pop()
            if lease.token is None or now - lease.since < TOKEN_REUSE_SECONDS:
                return lease
            self._give_back(lease)
        if self.gate is None:
            return _Lease(None, now)
        token = self.gate.try_acquire()
        return _Lease(token, now) if token is not None else None

    def put(self, lease: _Lease) -> None:
        self.spare.append(lease)

    def _give_back(self, lease: _Lease) -> None:
        if lease.token is not None and self.gate is not None:
            self.gate.release(lease.token)

    def close(self) -> None:
        for lease in self.spare:
            self._give_back(lease)
        self.spare.clear()


def _one_at_a_time(items: Iterable[T], fetch: Callable[[T], R]) -> Generator[tuple[T, Future[R]], None, None]:
    """:func:`in_order` with ``limit=1``, in the caller's thread: each fetch runs when the caller asks for it."""
    for item in items:
        future: Future[R] = Future()
        try:
            future.set_result(fetch(item))
        except Exception as exc:  # handed over at its turn, as from a thread; KeyboardInterrupt and kin go up now
            future.set_exception(exc)
        yield item, future


def in_order(
    items: Iterable[T],
    fetch: Callable[[T], R],
    *,
    limit: int,
    release: Callable[[R], None],
    gate: RequestGate | None = None,
    name: str = "trolley-fetch",
) -> Generator[tuple[T, Future[R]], None, None]:
    """``(item, future of fetch(item))`` for each item, in order, with up to ``limit`` fetches running at once.

    The caller takes each future's ``result()`` (which raises what ``fetch`` raised) and owns that result from then
    on. ``release`` is called on results the caller never got (see the module docstring).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if limit == 1:  # one at a time: no thread to hand each request to and wait for
        yield from _one_at_a_time(items, fetch)
        return
    pending = iter(items)
    exhausted = False
    running: deque[tuple[T, Future[R], _Lease]] = deque()
    held: _Lease | None = None  # the permission of the answer the caller holds
    leases = _Leases(gate)
    pool = ThreadPoolExecutor(limit, thread_name_prefix=name)

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(running) < limit:
            lease = leases.take()
            if lease is None:
                return  # the shared cap is reached: fewer at once for now
            for item in pending:
                running.append((item, pool.submit(fetch, item), lease))
                break
            else:
                exhausted = True
                leases.put(lease)

    try:
        fill()
        while running:
            item, future, held = running.popleft()
            yield item, future
            leases.put(held)  # the caller is done with that answer: its permission goes to the next request
            held = None
            fill()
    finally:
        for _, future, _lease in running:
            future.cancel()
        for _, future, lease in running:
            if not future.cancelled() and future.exception() is None:
                release(future.result())
            leases.put(lease)
        running.clear()
        if held is not None:
            leases.put(held)
        leases.close()
        pool.shutdown(wait=True)
