"""The throttle against a real Redis: semaphore with leases, token bucket, window, AIMD."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from trolley_tasks.engine.throttle import Throttle, ThrottleBusy, Window
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.profiles import parse_rate


def test_semaphore_caps_slots_across_clients(redis_db) -> None:  # type: ignore[no-untyped-def]
    one = Throttle(redis_db.client(), "pacs", max_concurrency=2)
    other = Throttle(redis_db.client(), "pacs", max_concurrency=2)  # another worker process, same Redis
    first, second = one.try_acquire(), other.try_acquire()
    assert first and second
    assert one.try_acquire() is None and other.try_acquire() is None
    with pytest.raises(ThrottleBusy), other.slot(max_wait=0.1):
        pass
    one.release(first)
    with other.slot(max_wait=0.1):
        assert one.in_use() == 2
    assert one.in_use() == 1


def test_a_killed_holder_does_not_leak_its_slot(redis_db) -> None:  # type: ignore[no-untyped-def]
    throttle = Throttle(redis_db.client(), "pacs", max_concurrency=1, lease_seconds=0.3)
    assert throttle.try_acquire() is not None  # never released: its process "died"
    assert throttle.try_acquire() is None
    time.sleep(0.4)
    assert throttle.try_acquire() is not None


def test_aimd_halves_on_busy_and_recovers(redis_db) -> None:  # type: ignore[no-untyped-def]
    throttle = Throttle(redis_db.client(), "pacs", max_concurrency=8)
    throttle.decrease_interval = throttle.increase_interval = 0.0
    assert throttle.busy() == 4 and throttle.busy() == 2 and throttle.busy() == 1 and throttle.busy() == 1
    assert throttle.effective_limit() == 1
    assert throttle.try_acquire() is not None and throttle.try_acquire() is None
    assert throttle.success() == 2
    other = Throttle(redis_db.client(), "other", max_concurrency=8)
    assert other.busy() == 4
    assert other.busy() == 4  # one overload seen by many workers halves once per interval


def test_token_bucket_spaces_requests(redis_db) -> None:  # type: ignore[no-untyped-def]
    throttle = Throttle(redis_db.client(), "pacs", max_concurrency=1, rate_limit="20/s")
    start = time.monotonic()
    for _ in range(30):  # 20 from the burst, then 10 at 20/s: about half a second
        throttle.take()
    assert time.monotonic() - start >= 0.4


def test_parsing() -> None:
    assert parse_rate("50/s") == 50 and parse_rate("600/m") == 10 and parse_rate("3600/h") == 1
    for bad in ("fast", "0/s", "5/d"):
        with pytest.raises(ConfigurationError):
            Throttle(None, "pacs", max_concurrency=1, rate_limit=bad)  # type: ignore[arg-type]
    night = Window.parse("20:00-06:00")
    assert night.seconds_until_open(datetime(2024, 1, 1, 23, 0)) == 0
    assert night.seconds_until_open(datetime(2024, 1, 1, 5, 59)) == 0
    assert night.seconds_until_open(datetime(2024, 1, 1, 19, 0)) == 3600
    assert night.seconds_until_open(datetime(2024, 1, 1, 6, 0)) == 14 * 3600
    day = Window.parse("08:30-17:00")
    assert day.seconds_until_open(datetime(2024, 1, 1, 18, 0)) == (14 * 60 + 30) * 60
    for bad in ("8-17", "25:00-06:00"):
        with pytest.raises(ConfigurationError):
            Window.parse(bad)


def test_waits_for_the_throttle_are_counted(redis_db) -> None:  # type: ignore[no-untyped-def]
    throttle = Throttle(redis_db.client(), "pacs", max_concurrency=1, rate_limit="20/s", lease_seconds=0.3)
    with throttle.slot(max_wait=1):
        pass
    assert throttle.waits() == {"slot": 0, "slot_seconds": 0, "rate": 0, "rate_seconds": 0}  # a free slot: no wait
    assert throttle.try_acquire() is not None  # held by a process that died: it lapses after 0.3 s
    with throttle.slot(max_wait=2):
        pass
    with pytest.raises(ThrottleBusy):
        held = throttle.try_acquire()
        assert held is not None
        with throttle.slot(max_wait=0.05):
            pass
    for _ in range(25):  # past the burst of 20: the bucket holds the rest back
        throttle.take()
    waits = throttle.waits()
    assert waits["slot"] == 2 and waits["slot_seconds"] > 0.2  # the lapse, then the refusal
    assert waits["rate"] >= 1 and waits["rate_seconds"] > 0
