"""The ledger against a real Redis: transitions are idempotent, and exactly one caller finalizes a job."""

from __future__ import annotations

import redis

from trolley_tasks.cohort import CohortRow
from trolley_tasks.engine.ledger import ClaimCode, Ledger, Outcome, Settled, Stored
from trolley_tasks.engine.models import Exclusion, Failure, InstanceState, JobState

JOB = "j-test"
ST, SE = "1.2.3", "1.2.3.4"
ROW = CohortRow(study_uid=ST)
UIDS = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]


def started(redis_db) -> Ledger:  # type: ignore[no-untyped-def]
    ledger = Ledger(redis_db.client())
    assert ledger.create_job(JOB, {"source": "pacs", "output": "/tmp/x", "layout": "flat"})
    assert ledger.add_row(JOB, ROW)
    return ledger


def all_claimed(redis_db) -> Ledger:  # type: ignore[no-untyped-def]
    """The job's one row expanded into UIDS, every row queued, and all of UIDS claimed by one fetch."""
    ledger = started(redis_db)
    ledger.expand(JOB, ST, SE, UIDS)
    ledger.row_done(JOB, ROW.row_id())
    ledger.producer_done(JOB)
    ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=60, max_redeliveries=3)
    return ledger


def test_expand_counts_each_instance_once(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = started(redis_db)
    assert ledger.expand(JOB, ST, SE, UIDS).publish == UIDS
    assert (
        ledger.expand(JOB, ST, SE, UIDS).publish == UIDS
    )  # a re-run publishes pending ones again, counts nothing twice
    status = ledger.status(JOB)
    assert status is not None and status.expected == 3 and status.state is JobState.EXPANDING
    assert not ledger.add_row(JOB, ROW)


def test_duplicate_delivery_never_double_counts_and_one_finalizer(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = started(redis_db)
    ledger.expand(JOB, ST, SE, UIDS)
    assert not ledger.row_done(JOB, ROW.row_id())
    assert not ledger.producer_done(JOB)
    assert ledger.status(JOB).state is JobState.RUNNING  # type: ignore[union-attr]
    claim = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=60, max_redeliveries=3)
    assert claim.with_code(ClaimCode.CLAIMED) == UIDS
    again = ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=60, max_redeliveries=3)
    assert again.with_code(ClaimCode.HELD) == UIDS  # a duplicate message while the first holder runs: skipped
    results = [Settled(uid, Outcome.DONE, 1, size=10, path=f"a/{uid}.dcm") for uid in UIDS[:2]]
    assert not ledger.settle(JOB, SE, results)
    assert not ledger.settle(JOB, SE, results)  # duplicate: no change
    failure = Failure(instance_uid=UIDS[2], error_class="not-found", error="NotFoundError", message="gone", attempts=1)
    assert ledger.settle(JOB, SE, [Settled(UIDS[2], Outcome.FAILED, 1, failure=failure)])  # the one finalizer
    assert not ledger.settle(JOB, SE, [Settled(UIDS[2], Outcome.FAILED, 1, failure=failure)])
    status = ledger.status(JOB)
    assert status is not None
    assert (status.expected, status.done, status.failed, status.bytes) == (3, 2, 1, 20)
    assert status.state is JobState.DONE_WITH_FAILURES and status.failures_by_class == {"not-found": 1}
    [progress] = list(ledger.series_progress(JOB))
    assert (progress.expected, progress.done, progress.failed) == (3, 2, 1)
    records = {r.instance_uid: r for r in ledger.instances(JOB)}
    assert records[UIDS[0]].state is InstanceState.DONE and records[UIDS[0]].path == f"a/{UIDS[0]}.dcm"
    assert records[UIDS[2]].state is InstanceState.FAILED and records[UIDS[2]].error_class == "not-found"


def test_redelivery_counter_fails_poison_instance(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = started(redis_db)
    ledger.expand(JOB, ST, SE, UIDS[:1])
    ledger.row_done(JOB, ROW.row_id())
    ledger.producer_done(JOB)
    codes = []
    for _ in range(4):
        claim = ledger.claim(JOB, SE, UIDS[:1], redelivered=True, lease_seconds=60, max_redeliveries=2)
        codes.append(claim.codes[UIDS[0]][0])
    # first delivery claims; redeliveries 1 and 2 take over; the third redelivery is poison; then terminal
    assert codes == ["c", "c", "c", "x"]
    status = ledger.status(JOB)
    assert status is not None and status.failed == 1 and status.state is JobState.DONE_WITH_FAILURES
    [failure] = list(ledger.failures(JOB))
    assert failure.error == "PoisonInstanceError" and failure.series_uid == SE


def test_pause_blocks_claims_and_resume_finalizes(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = started(redis_db)
    ledger.expand(JOB, ST, SE, UIDS[:1])
    ledger.row_done(JOB, ROW.row_id())
    ledger.producer_done(JOB)
    claim = ledger.claim(JOB, SE, UIDS[:1], redelivered=False, lease_seconds=60, max_redeliveries=3)
    assert ledger.pause(JOB, "user")
    assert (
        ledger.claim(JOB, SE, UIDS[:1], redelivered=False, lease_seconds=60, max_redeliveries=3).job_state == "paused"
    )
    # the fetch that was running when the pause came still settles; the job cannot end while paused
    assert not ledger.settle(JOB, SE, [Settled(UIDS[0], Outcome.DONE, claim.codes[UIDS[0]][1] + 1, size=5)])
    assert ledger.state(JOB) == "paused"
    assert ledger.resume(JOB) == (True, True)
    assert ledger.state(JOB) == "done"


def test_retry_failed_reopens_and_cancel_keeps_done(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = all_claimed(redis_db)
    failure = Failure(error_class="not-found", error="NotFoundError", message="gone")
    ledger.settle(
        JOB,
        SE,
        [Settled(u, Outcome.FAILED, 1, failure=failure) for u in UIDS[1:]] + [Settled(UIDS[0], Outcome.DONE, 1)],
    )
    ledger.expire_job(JOB)
    assert redis_db.client().ttl(ledger.series_key(JOB, SE)) > 0
    assert ledger.reopen(JOB, JobState.RUNNING) == "running"
    assert redis_db.client().ttl(ledger.series_key(JOB, SE)) == -1
    assert ledger.unfail(JOB, SE, UIDS) == UIDS[1:]
    assert list(ledger.pending(JOB)) == [(ST, SE, UIDS[1:])]
    assert ledger.cancel(JOB)
    status = ledger.status(JOB)
    assert status is not None and (status.state, status.done, status.failed) == (JobState.CANCELLED, 1, 0)
    assert ledger.claim(JOB, SE, UIDS, redelivered=False, lease_seconds=60, max_redeliveries=3).job_state == "cancelled"


def test_a_rerun_sees_where_done_instances_are_and_puts_back_only_those_still_stored_there(redis_db) -> None:  # type: ignore[no-untyped-def]
    ledger = all_claimed(redis_db)
    assert ledger.settle(
        JOB,
        SE,
        [
            Settled(UIDS[0], Outcome.DONE, 1, size=10, path="a/0.dcm"),
            Settled(UIDS[1], Outcome.SKIPPED, 1, size=20, path="a/1.dcm"),
            Settled(UIDS[2], Outcome.DONE, 1, size=30, path="a/2.dcm"),
        ],
    )
    assert ledger.unstore(JOB, SE, [Stored(UIDS[0], 10, "a/0.dcm")]) == []  # an ended job is not changed
    assert ledger.reopen(JOB, JobState.EXPANDING) == "expanding"  # the re-run
    expansion = ledger.expand(JOB, ST, SE, UIDS)
    assert expansion.publish == []
    assert expansion.stored == [
        Stored(UIDS[0], 10, "a/0.dcm"),
        Stored(UIDS[1], 20, "a/1.dcm"),
        Stored(UIDS[2], 30, "a/2.dcm"),
    ]
    gone = [Stored(UIDS[0], 10, "a/0.dcm"), Stored(UIDS[1], 20, "a/1.dcm"), Stored(UIDS[2], 30, "elsewhere.dcm")]
    assert ledger.unstore(JOB, SE, gone) == UIDS[:2]  # the third was stored at another path since: left alone
    assert ledger.unstore(JOB, SE, gone) == []  # twice: no change
    status = ledger.status(JOB)
    assert status is not None
    assert (status.expected, status.done, status.skipped, status.bytes) == (3, 1, 0, 30)
    [progress] = list(ledger.series_progress(JOB))
    assert (progress.expected, progress.done) == (3, 1)
    assert ledger.expand(JOB, ST, SE, UIDS).publish == UIDS[:2]
    claim = ledger.claim(JOB, SE, UIDS[:2], redelivered=False, lease_seconds=60, max_redeliveries=3)
    assert claim.with_code(ClaimCode.CLAIMED) == UIDS[:2] and all(claim.codes[u][1] == 0 for u in UIDS[:2])
    ledger.row_done(JOB, ROW.row_id())
    ledger.producer_done(JOB)
    done = [Settled(u, Outcome.DONE, 1, size=10, path=f"a/{i}.dcm") for i, u in enumerate(UIDS[:2])]
    assert ledger.settle(JOB, SE, done)  # the job ends again, counted once
    status = ledger.status(JOB)
    assert status is not None and (status.state, status.done, status.bytes) == (JobState.DONE, 3, 50)


def test_reads_over_every_series_or_row_take_a_round_trip_per_thousand(redis_db, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The progress display reads every series' counts each few seconds, and a resume every row: one HMGET or
    SISMEMBER per key took 3 s per look at 20,000 series."""
    ledger = started(redis_db)
    series = [f"{SE}.{n}" for n in range(2500)]
    for uid in series:
        ledger.expand(JOB, ST, uid, [f"{uid}.1"])
    rows = [CohortRow(study_uid=f"{ST}.{n}") for n in range(2500)]
    for row in rows:
        ledger.add_row(JOB, row)
    for row in rows[::2]:
        ledger.row_done(JOB, row.row_id())
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sent.append(1)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    progress = list(ledger.series_progress(JOB))
    assert len(progress) == 2500 and {p.series_uid for p in progress} == set(series)
    assert all((p.study_uid, p.expected, p.done) == (ST, 1, 0) for p in progress)
    assert len(sent) < 20
    sent.clear()
    assert set(ledger.unexpanded_rows(JOB)) == {row.row_id() for row in rows[1::2]} | {ROW.row_id()}
    assert len(sent) < 20


def test_failures_by_class_are_counted_by_every_transition_that_writes_or_removes_a_failure(
    redis_db, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A status reads the failures by class from one hash (it read every failure record, 0.3 s at 50,000 of them,
    on every poll of the progress display): after each transition it must say what the records say."""
    ledger = started(redis_db)
    uids = [f"{SE}.{n}" for n in range(5)]
    other = CohortRow(study_uid=f"{ST}.9")
    ledger.add_row(JOB, other)

    def by_scan() -> dict[str, int]:
        counts: dict[str, int] = {}
        for failure in ledger.failures(JOB):
            counts[failure.error_class] = counts.get(failure.error_class, 0) + 1
        return counts

    def agrees(expected: dict[str, int]) -> None:
        status = ledger.status(JOB)
        assert status is not None and status.failures_by_class == by_scan() == expected

    def failure(error_class: str) -> Failure:
        return Failure(error_class=error_class, error="E", message="m", attempts=1)

    ledger.expand(JOB, ST, SE, uids)
    ledger.row_done(JOB, other.row_id(), failure("not-found"))  # a row that could not be expanded
    agrees({"not-found": 1})
    ledger.claim(JOB, SE, uids, redelivered=False, lease_seconds=60, max_redeliveries=3)
    ledger.settle(
        JOB,
        SE,
        [Settled(uids[0], Outcome.FAILED, 1, failure=failure("not-found"))]
        + [Settled(uids[1], Outcome.FAILED, 1, failure=failure("server-error"))]
        + [Settled(uids[2], Outcome.FAILED, 1, failure=failure("server-error"))],
    )
    ledger.settle(JOB, SE, [Settled(uids[0], Outcome.FAILED, 1, failure=failure("timeout"))])  # a duplicate: no change
    agrees({"not-found": 2, "server-error": 2})
    ledger.claim(JOB, SE, uids[3:4], redelivered=True, lease_seconds=60, max_redeliveries=0)  # poison
    agrees({"not-found": 2, "server-error": 2, "request-rejected": 1})
    ledger.unfail(JOB, SE, uids[1:2])  # retry-failed
    agrees({"not-found": 2, "server-error": 1, "request-rejected": 1})
    assert ledger.unfail_row(JOB, other.row_id())
    agrees({"not-found": 1, "server-error": 1, "request-rejected": 1})
    ledger.row_done(JOB, other.row_id(), failure("bad-row"))
    agrees({"not-found": 1, "server-error": 1, "request-rejected": 1, "bad-row": 1})
    assert ledger.reopen(JOB, JobState.EXPANDING) == "expanding"  # a re-run forgets the rows' failures
    agrees({"not-found": 1, "server-error": 1, "request-rejected": 1})
    ledger.unfail(JOB, SE, uids)
    agrees({})
    ledger.claim(JOB, SE, uids[:1], redelivered=False, lease_seconds=60, max_redeliveries=3)
    ledger.settle(JOB, SE, [Settled(uids[0], Outcome.FAILED, 1, failure=failure("timeout"))])

    def unread(job_id: str) -> None:
        raise AssertionError("a status read every failure record")

    monkeypatch.setattr(ledger, "failures", unread)
    status = ledger.status(JOB)
    assert status is not None and status.failures_by_class == {"timeout": 1}


def test_a_polls_status_leaves_the_exclusions_unread(redis_db, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ledger = started(redis_db)
    left_out = Exclusion(study_uid=ST, series_uid=SE, rule="Modality in [SR]", instances=3)
    ledger.exclude(JOB, left_out)
    full = ledger.status(JOB)
    assert full is not None and full.excluded == [left_out]

    def unread(job_id: str) -> None:
        raise AssertionError("a poll read every exclusion")

    monkeypatch.setattr(ledger, "exclusions", unread)
    polled = ledger.status(JOB, excluded=False)
    assert polled is not None and polled.excluded == [] and polled.state is full.state
