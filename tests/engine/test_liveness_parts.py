"""The liveness building blocks against a real Redis: claim tokens and the heartbeat, the breaker, delayed work in
Redis, the watchdog and the one TTL. The same mechanisms run under real workers in test_liveness.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from testbed.cohort import generate_cohort
from tests.engine.fakes import FakeDownloader, FakeSearcher, RecordingPublisher, make_context
from trolley_tasks.cohort import CohortRow
from trolley_tasks.engine.breaker import Breaker
from trolley_tasks.engine.context import EngineContext
from trolley_tasks.engine.heartbeat import Heartbeat, LeaseLost
from trolley_tasks.engine.ledger import ClaimCode, Ledger, Outcome, Settled
from trolley_tasks.engine.messages import FetchMessage
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.producer import submit
from trolley_tasks.engine.scheduler import DELAYED_KEY, DeferringPublisher
from trolley_tasks.engine.watchdog import Watchdog
from trolley_tasks.errors import ErrorClass

JOB = "j-live"
ST, SE = "1.2.3", "1.2.3.4"
ROW = CohortRow(study_uid=ST)
UIDS = ["1.2.3.4.1", "1.2.3.4.2"]


def running_job(ledger: Ledger) -> None:
    ledger.create_job(JOB, {"source": "pacs", "output": "/tmp/x", "layout": "flat", "batch_size": 10})
    ledger.add_row(JOB, ROW)
    ledger.expand(JOB, ST, SE, UIDS)
    ledger.row_done(JOB, ROW.row_id())
    ledger.producer_done(JOB)


def test_only_the_claim_that_holds_a_lease_can_renew_it(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = Ledger(redis_db.client())
    running_job(ledger)
    claim = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=60, max_redeliveries=3)
    token, whole = ledger.renew(JOB, SE, claim.lease, UIDS, 60)
    assert whole and token != claim.lease
    _, whole = ledger.renew(JOB, SE, claim.lease, UIDS, 60)  # the old token no longer matches: not ours any more
    assert not whole
    _, whole = ledger.renew(JOB, SE, token, UIDS, 60)
    assert whole


def test_heartbeat_keeps_a_short_lease_alive_and_notices_a_takeover(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = Ledger(redis_db.client())
    running_job(ledger)
    claim = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=1.5, max_redeliveries=3)
    with Heartbeat(ledger, JOB, 1.5, SE, claim.lease, UIDS) as beat:
        time.sleep(2.5)  # longer than the lease: only the heartbeat keeps it
        again = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=1.5, max_redeliveries=3)
        assert again.with_code(ClaimCode.HELD) == UIDS
        beat.check()
    claim = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=0.2, max_redeliveries=3)
    time.sleep(0.4)  # lapsed without a heartbeat: another delivery takes it over
    ledger.claim(JOB, SE, UIDS, redelivered=True, lease_seconds=60, max_redeliveries=3)
    beat = Heartbeat(ledger, JOB, 0.2, SE, claim.lease, UIDS)
    beat.beat()
    with pytest.raises(LeaseLost):
        beat.check()


def test_breaker_holds_the_source_after_consecutive_failures_and_lets_one_probe_through(redis_db) -> None:  # type: ignore[no-untyped-def]
    breaker = Breaker(redis_db.client(), "pacs", threshold=3, max_hold=60, probe_seconds=30)
    assert breaker.gate() == (0.0, False) and breaker.state() == "closed"
    assert breaker.failure(ErrorClass.NOT_FOUND) == 0  # an instance's problem, not the source's
    assert breaker.failure(ErrorClass.TRANSIENT) == 0
    assert breaker.failure(ErrorClass.TIMEOUT) == 0
    held = breaker.failure(ErrorClass.TRANSIENT)
    assert 4 < held <= 5 and breaker.state() == "open"
    hold, probe = breaker.gate()
    assert hold > 4 and not probe
    redis_db.client().hset(breaker.key, "open_until", 0)  # the hold is over
    assert breaker.gate() == (0.0, True)  # one probe
    hold, probe = breaker.gate()
    assert 0 < hold <= 5 and not probe  # the others wait for it
    assert breaker.failure(ErrorClass.TRANSIENT) >= 9  # the probe failed: held again, twice as long
    breaker.success()
    assert breaker.gate() == (0.0, False) and breaker.state() == "closed"


def test_retry_after_holds_the_whole_source_as_long_as_asked(redis_db) -> None:  # type: ignore[no-untyped-def]
    breaker = Breaker(redis_db.client(), "pacs", threshold=5, max_hold=60, probe_seconds=30)
    assert breaker.failure(ErrorClass.SERVER_BUSY, retry_after=600) > 599  # beyond max_hold: the server asked
    hold, _ = breaker.gate()
    assert hold > 599


def test_delayed_work_waits_in_redis_and_goes_out_when_due(redis_db) -> None:  # type: ignore[no-untyped-def]
    client = redis_db.client()
    ledger = Ledger(client)
    running_job(ledger)
    inner = RecordingPublisher()
    deferring = DeferringPublisher(inner, client, ledger.wait_until)
    message = FetchMessage(JOB, "pacs", ST, SE, tuple(UIDS))
    deferring.fetch(message, countdown=0.3)
    deferring.expand(JOB, "pacs", ROW.row_id(), 2, countdown=30)
    deferring.fetch(message)
    assert inner.fetches == [(message, 0.0)] and deferring.pending() == 2  # nothing became an ETA task
    assert float(client.hget(ledger.key(JOB, "job"), "wait_until")) > time.time() + 25
    assert deferring.publish_due() == 0
    time.sleep(0.4)
    assert deferring.publish_due() == 1
    assert inner.fetches[-1] == (message, 0.0) and client.zcard(DELAYED_KEY) == 1


def submitted(redis_url: str, out: Path, instances: int) -> tuple[EngineContext, RecordingPublisher, str]:
    """A one-study job submitted over a context whose publisher parks delayed work in Redis, as in production;
    ``RecordingPublisher`` stands in for the broker."""
    cohort = generate_cohort(studies=1, series=1, instances=instances, seed=5, rows=8, columns=8)
    ctx = make_context(redis_url, FakeSearcher(cohort), FakeDownloader(cohort))
    recorder = ctx.publisher
    assert isinstance(recorder, RecordingPublisher)
    ctx.publisher = DeferringPublisher(recorder, ctx.ledger.r, ctx.ledger.wait_until)
    return ctx, recorder, submit(ctx, cohort.study_refs(), source="pacs", output=out)


def test_watchdog_revives_a_stalled_job_and_leaves_a_moving_one_alone(redis_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx, recorder, job = submitted(redis_db.url, tmp_path, instances=2)
    assert len(recorder.expands) == 1
    recorder.expands.clear()  # the expansion message is lost (a broker that dropped it, a dead worker)
    watchdog = Watchdog(ctx, stall_seconds=1.0, interval=0.1)
    assert watchdog.tick().republished == {}  # the job just moved
    time.sleep(1.2)
    result = watchdog.tick()
    assert result.swept and result.republished == {job: 1} and len(recorder.expands) == 1
    assert watchdog.tick().republished == {}  # revived: it counts as activity
    other = Watchdog(ctx, stall_seconds=1.0, interval=0.1)
    assert not other.tick().swept  # one sweeper at a time


def test_watchdog_asks_again_for_a_missing_report(redis_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx, recorder, job = submitted(redis_db.url, tmp_path, instances=1)
    ctx.ledger.cancel(job)  # ended, and its finalize message was lost
    watchdog = Watchdog(ctx, stall_seconds=0.5, interval=0.1)
    time.sleep(0.6)
    assert watchdog.tick().finalize == [job] and recorder.finalizes == [job]
    assert watchdog.tick().finalize == []  # asked: it waits before asking again


def test_every_key_of_an_ended_job_expires_together(redis_db) -> None:  # type: ignore[no-untyped-def]
    client = redis_db.client()
    ledger = Ledger(client)
    running_job(ledger)
    claim = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=60, max_redeliveries=3)
    assert ledger.settle(JOB, SE, [Settled(uid, Outcome.DONE, 1) for uid in claim.with_code(ClaimCode.CLAIMED)])
    assert ledger.state(JOB) == JobState.DONE.value
    ledger.expire_job(JOB)
    ttls = {client.ttl(key) for key in client.scan_iter(f"trolley:{{{JOB}}}:*")}
    assert len(ttls) == 1 and ttls.pop() > 29 * 24 * 3600


def test_a_quiet_job_waiting_behind_a_busy_queue_is_left_alone(redis_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx, recorder, waiting = submitted(redis_db.url, tmp_path / "a", instances=1)
    recorder.expands.clear()
    time.sleep(1.2)
    running_job(ctx.ledger)  # another job, moving right now
    queued = {"messages": 7}
    watchdog = Watchdog(ctx, stall_seconds=1.0, interval=0.1, backlog=lambda: queued["messages"])
    assert watchdog.tick().republished == {}  # its messages are in the broker behind the other job's
    queued["messages"] = 0
    assert watchdog.tick().republished == {waiting: 1}  # nothing queued any more: it really is stranded


def test_broker_backlog_counts_the_engine_queues(redis_db) -> None:  # type: ignore[no-untyped-def]
    from trolley_tasks.engine.celery_app.app import make_app
    from trolley_tasks.engine.celery_app.publisher import CeleryPublisher
    from trolley_tasks.engine.celery_app.tasks import broker_backlog
    from trolley_tasks.engine.settings import BrokerConfig, Settings

    app = make_app(Settings(broker=BrokerConfig(url=redis_db.broker_url)))
    assert broker_backlog(app) == 0
    CeleryPublisher(app).fetch(FetchMessage(JOB, "pacs", ST, SE, tuple(UIDS)))
    CeleryPublisher(app).expand(JOB, "pacs", ROW.row_id())
    assert broker_backlog(app) == 2
    app.close()


def test_a_probe_that_ends_without_a_verdict_lets_the_next_caller_probe(redis_db) -> None:  # type: ignore[no-untyped-def]
    breaker = Breaker(redis_db.client(), "pacs", threshold=1, max_hold=60, probe_seconds=90)
    assert breaker.failure(ErrorClass.TRANSIENT) > 0
    redis_db.client().hset(breaker.key, "open_until", 0)
    assert breaker.gate() == (0.0, True)
    assert breaker.gate()[0] > 0  # the others wait for the probe ...
    breaker.release_probe()  # ... which had nothing to ask (no slot, all on disk): no verdict
    assert breaker.gate() == (0.0, True)  # the next caller probes at once, not after the probe's 90 s lease
    breaker.success()
    breaker.release_probe()
    assert not redis_db.client().exists(breaker.key)  # a release never reopens a closed breaker


def test_a_receiver_port_counts_as_taken_only_while_something_listens() -> None:
    import socket

    from trolley_tasks.engine.context import port_in_use

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert port_in_use(port)  # listening on one address blocks the wildcard test bind
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    for sock in (accepted, client, server):
        sock.close()
    assert not port_in_use(port)  # a dead receiver's lingering TIME_WAIT connections do not count as alive
