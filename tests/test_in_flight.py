"""Several requests in flight (downloaders/in_flight.py): answers in order, never more than the limit or the gate
allows, errors at their turn, and nothing left behind when the caller stops early. No timing is asserted: a barrier
proves that requests ran at once, and counters prove the bounds."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from trolley_tasks.downloaders.in_flight import RequestGate, in_order


class Tracker:
    """A fetch that counts how many answers exist at once (running, or held by the caller until released)."""

    def __init__(self, barrier: threading.Barrier | None = None, fail: dict[int, Exception] | None = None) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.most = 0
        self.barrier = barrier
        self.fail = fail or {}
        self.released: list[int] = []

    def fetch(self, item: int) -> int:
        with self.lock:
            self.live += 1
            self.most = max(self.most, self.live)
        if self.barrier is not None and item < self.barrier.parties:
            self.barrier.wait(timeout=30)  # the first requests must all be running at once to get past this
        if item in self.fail:
            with self.lock:
                self.live -= 1
            raise self.fail[item]
        return item

    def done(self, item: int) -> None:
        with self.lock:
            self.live -= 1

    def release(self, item: int) -> None:
        self.released.append(item)
        self.done(item)


class Gate:
    """A shared cap with ``room`` tokens."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.out: set[str] = set()
        self.given = 0
        self.refused = 0

    def try_acquire(self) -> str | None:
        if len(self.out) >= self.room:
            self.refused += 1
            return None
        self.given += 1
        token = f"t{self.given}"
        self.out.add(token)
        return token

    def release(self, token: str) -> None:
        self.out.remove(token)


def consume(tracker: Tracker, stream: object, until: Callable[[int], bool] = lambda item: False) -> list[int]:
    got = []
    for item, future in stream:  # type: ignore[attr-defined]
        value = future.result()
        assert value == item
        got.append(value)
        tracker.done(value)
        if until(value):
            break
    return got


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_answers_come_in_order_and_never_more_than_the_limit_at_once(limit: int) -> None:
    tracker = Tracker(barrier=threading.Barrier(limit))
    got = consume(tracker, in_order(range(20), tracker.fetch, limit=limit, release=tracker.release))
    assert got == list(range(20))
    assert tracker.most == limit  # the barrier let the first `limit` through together; never more
    assert tracker.released == []


@pytest.mark.parametrize("room", [0, 1, 3])
def test_requests_beyond_the_first_need_a_token_from_the_gate(room: int) -> None:
    gate = Gate(room)
    assert isinstance(gate, RequestGate)
    tracker = Tracker(barrier=threading.Barrier(1 + room))
    got = consume(tracker, in_order(range(12), tracker.fetch, limit=8, release=tracker.release, gate=gate))
    assert got == list(range(12))
    assert tracker.most == 1 + room
    assert gate.out == set()  # every token given back
    assert gate.given <= room * 12


def test_an_error_is_raised_at_its_turn_and_later_answers_are_released() -> None:
    gate = Gate(2)
    tracker = Tracker(fail={3: RuntimeError("boom")})
    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for item, future in in_order(range(10), tracker.fetch, limit=3, release=tracker.release, gate=gate):
            got.append(future.result())
            tracker.done(item)
    assert got == [0, 1, 2]
    assert set(tracker.released) <= {4, 5}  # the ones started behind the failure, never handed over
    assert tracker.live == 0 and gate.out == set()


def test_a_caller_that_stops_early_leaves_nothing_running() -> None:
    gate = Gate(3)
    tracker = Tracker()
    stream = in_order(range(10), tracker.fetch, limit=4, release=tracker.release, gate=gate)
    assert consume(tracker, stream, until=lambda item: item == 1) == [0, 1]
    stream.close()
    assert set(tracker.released) <= {2, 3, 4, 5}  # started ones are released; those not yet started, cancelled
    assert tracker.live == 0 and gate.out == set()


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next(in_order([1], lambda x: x, limit=0, release=lambda x: None))


def test_one_at_a_time_runs_in_the_callers_thread_and_fetches_nothing_ahead() -> None:
    seen: list[tuple[int, str]] = []

    def fetch(item: int) -> int:
        seen.append((item, threading.current_thread().name))
        if item == 2:
            raise RuntimeError("boom")
        return item

    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for _item, future in in_order(range(5), fetch, limit=1, release=lambda item: None):
            got.append(future.result())
    assert got == [0, 1]
    assert seen == [(n, threading.current_thread().name) for n in range(3)]  # nothing after the failure was asked
