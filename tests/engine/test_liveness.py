"""Liveness (issue 10): an unattended export always ends, or pauses with a reason, and never loses or strands an
instance. Real ``celery worker`` processes on a private Redis, a real Orthanc behind the fault proxy, assertions on
the ledger (through the EngineClient) and on the files.

The outages (a PACS down for minutes, 20% faults, Redis or a whole worker killed) are in test_liveness_outages.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from testbed.cohort import generate_cohort
from tests.engine.live import (
    FAST_ENGINE,
    REPORTS,
    SECRET_ENV,
    LiveStack,
    delayed,
    exported,
    failing_disk,
    grow_tmpfs,
    live_factory,
    small_tmpfs,
    stop_worker,
    unacked,
    verify_on_disk,
)
from tests.engine.proxy import Fault
from trolley_tasks.core import Query, SeriesReference
from trolley_tasks.engine.models import JobState, JobStatus

pytestmark = pytest.mark.slow

TEN = generate_cohort(studies=10, series=1, instances=10, seed=31, rows=64, columns=64)
"""Ten studies of one series of ten small instances: many searches, and batches of ten."""

live = pytest.fixture(name="live")(live_factory)


@pytest.fixture(scope="module")
def pacs10(orthanc_factory):  # type: ignore[no-untyped-def]
    return orthanc_factory(TEN)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.1)


def paused_for(status: JobStatus, *words: str) -> None:
    """The job is paused, and its reason says why in words a person can act on."""
    assert status.state is JobState.PAUSED, status
    reason = status.pause_reason.lower()
    assert reason and any(word.lower() in reason for word in words), f"pause reason {status.pause_reason!r}"


def done_or_resumed(stack: LiveStack, job: str, status: JobStatus, fix: Callable[[], Any], *words: str) -> JobStatus:
    """The job ended done, or paused naming the cause; then the cause is fixed and ``resume`` ends it done."""
    if status.state is JobState.PAUSED:
        paused_for(status, *words)
        fix()
        assert stack.engine.resume(job)
        status = stack.wait(job, timeout=180)
    assert status.state is JobState.DONE, status
    return status


# -- 1. after a claim, nothing strands a batch -------------------------------------------------------------------------


def test_time_limit_on_a_batch_does_not_strand_it(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live(engine={**FAST_ENGINE, "task_time_limit": 10})  # Celery's soft limit fires at 8 s, the hard at 10
    stack.workers(2)
    slow = Fault(f"/series/{orthanc.cohort.series_refs()[0].series_uid}", delay=20, times=1)
    stack.proxy.faults.append(slow)
    out = tmp_path / "out"
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
    status = stack.wait_settled(job, timeout=180)
    assert slow.served == 1  # the batch that outlived its time limit did happen
    status = done_or_resumed(stack, job, status, lambda: None, "time limit", "timelimit", "timeout")
    assert (status.expected, status.done, status.failed) == (18, 18, 0)
    verify_on_disk(out, orthanc.cohort, orthanc.cohort)


def test_disk_full_pauses_with_a_reason_then_resumes(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live()
    stack.workers(2)
    with small_tmpfs(tmp_path / "small", "2m") as out:  # room for 3 of the 18 instances of 526 KB
        job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
        status = stack.wait_settled(job)
        paused_for(status, "disk", "space", "ENOSPC", "full")
        assert status.failed == 0  # a full disk is the host's problem, not the instances'
        grow_tmpfs(out, "64m")
        assert stack.engine.resume(job)
        status = stack.wait(job, timeout=180)
        assert status.state is JobState.DONE and (status.done, status.failed) == (18, 0), status
        verify_on_disk(out, orthanc.cohort, orthanc.cohort)


def test_a_disk_that_fails_its_write_back_pauses_and_counts_nothing_lost(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The page cache takes every write, then the disk fails to write them back (the batch's syncfs reports it): the
    job pauses naming the host's disk, no instance fails for good, and every instance counted done is on disk."""
    stack = live()
    stack.workers(2)
    with failing_disk(tmp_path / "disk", real_mb=4, size_mb=64) as disk:  # 9.5 MB of instances, 4 MB of disk
        out = disk / "out"
        job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
        status = stack.wait_settled(job)
        paused_for(status, "Input/output", "No space", "Read-only")
        assert status.failed == 0 and status.done < 18, status
        on_disk = [p for p in exported(out) if p.suffix == ".dcm"] if out.is_dir() else []
        assert len(on_disk) == status.done  # nothing counted that a failed write-back lost
        uploaded = {item.sop_instance_uid: orthanc.cohort.encode(item) for item in orthanc.cohort}
        for path in on_disk:
            assert path.read_bytes() == uploaded[path.stem], f"{path} differs from the uploaded instance"


def test_redis_error_at_settle_does_not_strand_the_batch(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live()
    workers = stack.workers(2)
    slow = Fault(f"/series/{orthanc.cohort.series_refs()[0].series_uid}", delay=3, times=1)
    stack.proxy.faults.append(slow)
    out = tmp_path / "out"
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
    wait_until(lambda: slow.served == 1, 60, "a claimed batch reaching the PACS")
    ledger = stack.redis.client()
    ledger.config_set("maxmemory-policy", "noeviction")
    ledger.config_set("maxmemory", 1)  # every write fails with OOM: the batch in hand cannot settle
    try:
        wait_until(lambda: slow.answered == 1, 30, "the slow batch answered")
        deadline = time.monotonic() + 10  # give the worker the time to try its settle, and fail it
        while b"OOM" not in workers.log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        ledger.config_set("maxmemory", 0)
    supervised = [workers]

    def settled(status: JobStatus) -> bool:
        if supervised[-1].process.poll() is not None:
            # Celery's own ack failed and its main process gave up ("Unrecoverable error"): a supervisor (systemd,
            # compose restart: always) starts it again; the ledger, not the dead worker, must bring the batch back
            supervised.append(stack.workers(2))
        return status.state.ended or status.state is JobState.PAUSED

    status = stack.wait(job, settled, timeout=180)
    status = done_or_resumed(stack, job, status, lambda: None, "redis", "OOM", "ledger", "memory")
    assert (status.expected, status.done, status.failed) == (18, 18, 0)
    verify_on_disk(out, orthanc.cohort, orthanc.cohort)


def test_worker_without_the_secret_pauses_with_a_reason(live, orthanc, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(SECRET_ENV, "s3cret")  # the producer has it: the job is accepted
    stack = live()
    lacking = stack.workers(2, environment={SECRET_ENV: None})
    out = tmp_path / "out"
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="secured", output=out)
    status = stack.wait_settled(job)
    paused_for(status, SECRET_ENV, "secret", "password")
    assert status.failed == 0
    stop_worker(lacking)
    stack.workers(2)  # a host that has the secret
    assert stack.engine.resume(job)
    status = stack.wait(job)
    assert status.state is JobState.DONE and (status.done, status.failed) == (18, 0), status
    verify_on_disk(out, orthanc.cohort, orthanc.cohort)


# -- 2. a re-run of a search cohort ends, and fetches nothing ----------------------------------------------------------


@pytest.mark.parametrize("keyword", ["PatientID", "AccessionNumber"])
def test_rerun_of_a_search_cohort_ends_done_and_fetches_nothing(live, orthanc, tmp_path: Path, keyword: str) -> None:  # type: ignore[no-untyped-def]
    stack = live()
    stack.workers(2)
    first = orthanc.cohort.instance(1, 0, 0)
    query = Query(**{keyword: first.patient_id if keyword == "PatientID" else first.accession_number})
    items = orthanc.cohort.in_study(first.study_uid)
    out = tmp_path / "out"
    job = stack.engine.submit(query, source="uri", output=out)
    status = stack.wait(job)
    assert status.state is JobState.DONE and status.done == status.expected == len(items), status
    fetched = len(stack.proxy.retrievals())
    assert fetched >= len(items)
    assert stack.engine.submit(query, source="uri", output=out) == job  # the same export: its job, reopened
    status = stack.wait(job, timeout=120)
    assert status.state is JobState.DONE and status.done == status.expected == len(items), status
    assert len(stack.proxy.retrievals()) == fetched, "the re-run fetched instances again"
    verify_on_disk(out, items, orthanc.cohort)


def test_a_rerun_whose_worker_died_after_putting_a_file_back_to_pending_still_fetches_it(
    live, orthanc, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A re-run's expansion puts a done instance whose file is gone back to pending (UNSTORE), then publishes it.
    Here the worker dies between the two: the ledger is left exactly as that death leaves it (the job reopened, the
    row's instances recorded, the instance pending, the row not expanded, no message anywhere). Real workers
    started afterwards must still end the job done with the file back, through the watchdog's stall sweep."""
    stack = live()
    workers = stack.workers(2)
    out = tmp_path / "out"
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
    assert stack.wait(job).state is JobState.DONE
    stop_worker(workers)
    gone = orthanc.cohort.instance(0, 1, 2)
    (out / gone.study_uid / gone.series_uid / f"{gone.sop_instance_uid}.dcm").unlink()
    ledger = stack.engine.ledger
    assert ledger.reopen(job, JobState.EXPANDING) == "expanding"  # the re-run's producer: rows queued...
    ledger.producer_done(job)  # ...all of them; their messages are lost with the worker, like its own
    uids = [
        item.sop_instance_uid for item in orthanc.cohort.in_study(gone.study_uid) if item.series_uid == gone.series_uid
    ]
    expansion = ledger.expand(job, gone.study_uid, gone.series_uid, uids)
    lost = [item for item in expansion.stored if item.instance_uid == gone.sop_instance_uid]
    assert ledger.unstore(job, gone.series_uid, lost) == [gone.sop_instance_uid]  # ...and then the worker died
    assert stack.engine.status(job).done == 17
    stack.workers(2)
    status = stack.wait(job, timeout=120)
    assert status.state is JobState.DONE and (status.expected, status.done, status.failed) == (18, 18, 0), status
    verify_on_disk(out, orthanc.cohort, orthanc.cohort)


# -- 3. retry-failed with live workers -------------------------------------------------------------------------------


def test_retry_failed_with_live_workers_ends_done(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live()
    stack.workers(2)
    series = orthanc.cohort.series_refs()
    gone = [series[0].series_uid, series[2].series_uid, series[5].series_uid]  # one in each of the three studies
    stack.proxy.faults += [Fault(f"/series/{uid}", status=404, times=-1) for uid in gone]
    out = tmp_path / "out"
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
    status = stack.wait(job)
    assert status.state is JobState.DONE_WITH_FAILURES and (status.done, status.failed) == (9, 9), status
    stack.proxy.faults.clear()  # the PACS has them again
    assert stack.engine.retry_failed(job) == 9
    status = stack.wait(job)
    assert status.state is JobState.DONE and (status.expected, status.done, status.failed) == (18, 18, 0), status
    assert all(progress.complete for progress in stack.engine.series(job))
    verify_on_disk(out, orthanc.cohort, orthanc.cohort)


# -- 9. max_concurrency holds across workers, searches included -------------------------------------------------


def test_max_concurrency_holds_across_two_workers_during_searches_too(live, pacs10, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live(pacs=pacs10)
    stack.workers(4)
    stack.workers(4)
    stack.proxy.delay = 0.05  # requests of different processes overlap unless something caps them
    # a few searches outlast a lease (6 s): only a heartbeat keeps their slot from going to another worker
    lease = FAST_ENGINE["lease_seconds"]
    stack.proxy.faults += [Fault(ending, delay=lease + 2, times=2) for ending in ("/series", "/instances")]
    out = tmp_path / "out"
    job = stack.engine.submit(TEN.study_refs(), source="throttled", output=out, batch_size=1)
    status = stack.wait(job, timeout=300)
    assert status.state is JobState.DONE and status.done == len(TEN), status
    assert len(stack.proxy.searches()) >= len(TEN.study_refs())  # every study was expanded through the proxy
    assert 1 <= stack.proxy.max_in_flight <= 2, f"the PACS saw {stack.proxy.max_in_flight} requests at once"
    verify_on_disk(out, TEN)


# -- 10. waits live in Redis, not in workers ---------------------------------------------------------------------------


@pytest.mark.parametrize("hold", ["window", "retry-after"])
def test_waits_do_not_become_worker_side_eta_messages(live, orthanc, tmp_path: Path, hold: str) -> None:  # type: ignore[no-untyped-def]
    stack = live(engine={**FAST_ENGINE, "stall_seconds": 600})  # no stall sweep re-publishes while we watch
    stack.workers(2)
    source = "closed" if hold == "window" else "rs"
    busy = [
        Fault(f"/series/{ref.series_uid}", status=503, retry_after="60", times=-1)
        for ref in orthanc.cohort.series_refs()
    ]
    if hold == "retry-after":
        stack.proxy.faults += busy
    job = stack.engine.submit(orthanc.cohort.study_refs(), source=source, output=tmp_path / "out")
    broker = stack.redis.client()
    app = stack.engine.app
    assert app is not None

    def ours(tasks: dict[str, list[dict[str, Any]]] | None) -> list[str]:
        return [str(t.get("name") or t.get("request", {}).get("name")) for ts in (tasks or {}).values() for t in ts]

    def waiting() -> bool:  # the wait is visible somewhere: in the delayed set, or as messages held by workers
        if hold == "retry-after" and not any(fault.served for fault in busy):
            return False
        return bool(delayed(broker) or unacked(broker))

    wait_until(waiting, 60, "the job waiting")
    wait_until(lambda: unacked(broker) == 0, 15, f"workers holding {unacked(broker)} messages while the job waits")
    observed = time.monotonic() + 5  # the scenario is a duration: the wait must hold no message all along
    while time.monotonic() < observed:
        assert unacked(broker) == 0, "a worker took a message of a waiting job"
        time.sleep(0.2)
    inspect = app.control.inspect(timeout=2)
    held = ours(inspect.scheduled()) + ours(inspect.reserved())
    assert not [name for name in held if name.startswith("trolley.")], f"ETA/reserved tasks in workers: {held}"
    in_redis = delayed(broker)
    assert in_redis is None or in_redis > 0
    status = stack.engine.status(job)
    assert not status.state.ended and status.done == 0, status
    if hold == "retry-after":
        assert all(fault.served <= 2 for fault in busy), "Retry-After: 60 was not honoured"
    stack.engine.cancel(job)


# -- 11. quarantine stays in the work area --------------------------------------------------------------------------


def test_quarantine_lives_under_the_hidden_work_area(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live()
    stack.workers(2)
    cut = orthanc.cohort.series_refs()[3].series_uid
    stack.proxy.faults.append(Fault(f"/series/{cut}", truncate=True, times=-1))
    out = tmp_path / "out"
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=out)
    status = stack.wait(job, until=lambda s: s.state.ended and s.reported_at is not None)
    assert status.state is JobState.DONE_WITH_FAILURES and status.failed >= 1, status
    done = {r.instance_uid for r in stack.engine.instances(job) if r.state.value == "done"}
    instances, strays = set(), []
    for path in exported(out):
        if path.parent == out and path.name in REPORTS:
            continue
        try:  # anything else must be a valid instance of the export, at its place
            ds = dcmread(path)
        except Exception:  # not DICOM, or cut short
            strays.append(path.relative_to(out))
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        place = out / str(ds.get("StudyInstanceUID", "")) / str(ds.get("SeriesInstanceUID", "")) / f"{uid}.dcm"
        if uid in done and path == place:
            instances.add(uid)
        else:
            strays.append(path.relative_to(out))
    assert not strays, f"files in the export tree that are not exported instances: {strays}"
    assert instances == done and all((out / name).is_file() for name in REPORTS)
    assert [p for p in (out / ".trolley" / "quarantine").rglob("*") if p.is_file()], "nothing quarantined"


# -- 12. one TTL for every key of a job ------------------------------------------------------------------------------


def test_every_key_of_an_ended_job_has_the_same_ttl(live, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live()
    stack.workers(2)
    stack.proxy.faults.append(Fault(f"/series/{orthanc.cohort.series_refs()[1].series_uid}", status=404))
    job = stack.engine.submit(orthanc.cohort.study_refs(), source="rs", output=tmp_path / "out")
    status = stack.wait(job, until=lambda s: s.state.ended and s.reported_at is not None)
    assert status.state is JobState.DONE_WITH_FAILURES, status  # a failure: the failures hash exists too
    ledger = stack.redis.client()
    keys = sorted(ledger.scan_iter(match=f"trolley:{{{job}}}:*"))
    assert len(keys) > 3
    wait_until(lambda: all(ledger.pttl(key) > 0 for key in keys), 30, "every key of the job with a TTL")
    ttls = {key.decode(): ledger.pttl(key) for key in keys}
    assert max(ttls.values()) - min(ttls.values()) <= 1000, ttls


# -- 13. logs stay readable ------------------------------------------------------------------------------------------

UID_TOKEN = re.compile(r"\d+(?:\.\d+){2,}")


def test_failed_batch_logs_one_line_per_error_class_with_a_count(live, pacs10, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = live(pacs=pacs10)
    workers = stack.workers(2)
    first = TEN.instance(0, 0, 0)
    stack.proxy.faults.append(Fault(f"/series/{first.series_uid}", status=404, times=-1))
    job = stack.engine.submit(
        [SeriesReference(first.study_uid, first.series_uid)], source="rs", output=tmp_path / "out", batch_size=10
    )
    status = stack.wait(job)
    assert status.state is JobState.DONE_WITH_FAILURES and status.failed == 10, status
    uids = {item.sop_instance_uid for item in TEN.in_study(first.study_uid)}

    def about() -> list[str]:
        lines = workers.log.read_text(errors="replace").splitlines()
        return [line for line in lines if re.search("not.?found", line, re.I) or any(uid in line for uid in uids)]

    def counts_ten(line: str) -> bool:  # "not-found x10 (...)": a number of its own, not inside a UID
        text = UID_TOKEN.sub("", line.split("] ", 1)[-1])
        return bool(re.search("not.?found", line, re.I) and re.search(r"(?<!\d)10(?!\d)", text))

    # one line counts the batch's 10 failures: its summary, logged right after the settle that may end the job
    wait_until(lambda: any(counts_ten(line) for line in about()), 10, "a line counting the 10 not-found failures")
    lines = about()
    # a UID counts as one word: up to 64 characters each (PS3.5 9.1), they would make the limit a matter of test data
    long = [line for line in lines if len(UID_TOKEN.sub("<uid>", line)) > 500]
    assert not long, f"a log line of over 500 characters (UIDs aside): {long[0][:800]}"
    assert len([line for line in lines if re.search("not.?found", line, re.I)]) < 10, "one line per instance"
