"""Producer, expansion and fetch as plain functions (no Celery), over a real Redis, fake PACS clients and real storage.

These pin the retry table's behaviour per error class, the per-instance accounting of batches, idempotence, the
window hold, and completeness; the same paths run under real workers and a real Orthanc in test_workers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.cohort import generate_cohort
from tests.engine.fakes import FakeDownloader, FakeSearcher, RecordingPublisher, drain, make_context
from trolley_tasks.core import InstanceReference, QueryLevels
from trolley_tasks.engine.api import EngineClient
from trolley_tasks.engine.context import EngineContext
from trolley_tasks.engine.expand import expand_row
from trolley_tasks.engine.fetch import fetch_batch
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.producer import submit
from trolley_tasks.engine.settings import Settings
from trolley_tasks.errors import AuthError, NotFoundError, ServerBusyError, ServerError, TransientNetworkError
from trolley_tasks.formats.part10 import Part10File
from trolley_tasks.profiles import SourceProfile
from trolley_tasks.searchers.dicom_qr import DICOMQR

COHORT = generate_cohort(studies=2, series=2, instances=3, seed=11, rows=8, columns=8)


def run(ctx, out: Path, **kwargs):  # type: ignore[no-untyped-def]
    """Submit the cohort by references, expand every row, fetch until nothing is queued."""
    publisher = ctx.publisher
    job = submit(ctx, COHORT.study_refs(), source="pacs", output=out, batch_size=4, **kwargs)
    while publisher.expands:
        j, source, row, attempt, _ = publisher.expands.pop(0)
        expand_row(ctx, j, source, row, attempt)
    drain(ctx, lambda m: fetch_batch(ctx, m))
    return job


def files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.dcm") if ".trolley" not in p.parts)


def test_export_end_to_end_writes_files_ledger_and_report(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    downloader = FakeDownloader(COHORT)
    ctx = make_context(redis_db.url, FakeSearcher(COHORT), downloader)
    job = run(ctx, tmp_path)
    status = ctx.ledger.status(job)
    assert status is not None and status.state is JobState.DONE
    assert (status.expected, status.done, status.failed, status.skipped) == (12, 12, 0, 0)
    assert len(files(tmp_path)) == 12
    assert downloader.calls == 4  # 4 series of 3 instances, batch size 4: one message per series
    assert status.reported_at is not None
    report = json.loads((tmp_path / "trolley-report.json").read_text())
    assert report["job_id"] == job and report["counts"]["done"] == 12 and len(report["instances"]) == 12
    first = report["instances"][0]
    assert (tmp_path / first["path"]).is_file() and first["status"] == "done" and first["attempts"] == 1
    assert (tmp_path / "trolley-report.csv").read_text().count("\n") == 13
    # the same export again: same job id, nothing fetched twice
    again = run(ctx, tmp_path)
    assert again == job and downloader.calls == 4
    assert ctx.ledger.status(job).state is JobState.DONE  # type: ignore[union-attr]


def test_new_job_counts_valid_files_on_disk_without_fetching(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    downloader = FakeDownloader(COHORT)
    ctx = make_context(redis_db.url, FakeSearcher(COHORT), downloader)
    run(ctx, tmp_path)
    calls = downloader.calls
    job = run(ctx, tmp_path, new_job=True)
    status = ctx.ledger.status(job)
    assert status is not None and status.state is JobState.DONE and status.skipped == 12 and status.done == 12
    assert downloader.calls == calls


def test_partly_failed_batch_requeues_only_its_failed_instances(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    third = COHORT.instance(0, 0, 2).sop_instance_uid

    def fail(call: int, ref: InstanceReference) -> Exception | None:
        return ServerError("HTTP 500", source="pacs") if ref.instance_uid == third and call == 1 else None

    ctx = make_context(redis_db.url, FakeSearcher(COHORT), FakeDownloader(COHORT, fail))
    publisher = ctx.publisher
    assert isinstance(publisher, RecordingPublisher)
    job = submit(ctx, COHORT.study_refs()[:1], source="pacs", output=tmp_path, batch_size=10)
    expand_row(ctx, job, "pacs", publisher.expands.pop()[2])
    message, _ = publisher.fetches.pop(0)
    result = fetch_batch(ctx, message)
    assert (result.fetched, result.requeued, result.failed) == (2, 1, 0)
    again, countdown = publisher.fetches[-1]  # after the other series' message
    assert again.instances == (third,) and countdown >= 0
    drain(ctx, lambda m: fetch_batch(ctx, m))
    records = {r.instance_uid: r for r in ctx.ledger.instances(job)}
    assert records[third].attempts == 2 and records[third].state.value == "done"


def test_retry_table_per_error_class(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = COHORT.instance(0, 0, 0).sop_instance_uid
    errors = {
        "404": NotFoundError("HTTP 404", source="pacs"),
        "reset": TransientNetworkError("connection reset", source="pacs"),
    }
    mode = {"now": "404"}

    def fail(call: int, ref: InstanceReference) -> Exception | None:
        return errors[mode["now"]] if ref.instance_uid == first else None

    downloader = FakeDownloader(COHORT, fail)
    ctx = make_context(redis_db.url, FakeSearcher(COHORT), downloader)
    job = run(ctx, tmp_path)
    status = ctx.ledger.status(job)
    assert status is not None and status.state is JobState.DONE_WITH_FAILURES
    assert status.failed == 1 and status.failures_by_class == {"not-found": 1}
    [failure] = list(ctx.ledger.failures(job))
    assert failure.instance_uid == first and failure.attempts == 1 and failure.error == "NotFoundError"
    [series] = [s for s in ctx.ledger.series_progress(job) if s.failed]
    assert (series.expected, series.done, series.failed) == (3, 2, 1)
    # transient errors: quick retries inside the fetch, then countdown re-queues, 8 tries in all, then failed
    mode["now"] = "reset"
    assert EngineClient.over(ctx).retry_failed(job) == 1
    drain(ctx, lambda m: fetch_batch(ctx, m))
    [failure] = list(ctx.ledger.failures(job))
    assert failure.error_class == "transient" and failure.attempts == 8
    # fixed on the server: retry-failed completes the job
    downloader.fail = None
    assert EngineClient.over(ctx).retry_failed(job) == 1
    drain(ctx, lambda m: fetch_batch(ctx, m))
    assert ctx.ledger.status(job).state is JobState.DONE  # type: ignore[union-attr]


def test_auth_error_pauses_the_job_and_resume_finishes(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = {"auth": True}

    def fail(call: int, ref: InstanceReference) -> Exception | None:
        return AuthError("HTTP 401", source="pacs") if state["auth"] else None

    ctx = make_context(redis_db.url, FakeSearcher(COHORT), FakeDownloader(COHORT, fail))
    job = run(ctx, tmp_path)
    status = ctx.ledger.status(job)
    assert status is not None and status.state is JobState.PAUSED and "auth" in status.pause_reason
    assert status.failed == 0 and status.done == 0
    state["auth"] = False
    assert EngineClient.over(ctx).resume(job)
    drain(ctx, lambda m: fetch_batch(ctx, m))
    assert ctx.ledger.status(job).state is JobState.DONE  # type: ignore[union-attr]
    assert len(files(tmp_path)) == 12


def test_server_busy_honours_retry_after_and_shrinks_concurrency(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def fail(call: int, ref: InstanceReference) -> Exception | None:
        return ServerBusyError("HTTP 503", source="pacs", retry_after=7) if call == 1 else None

    ctx = make_context(redis_db.url, FakeSearcher(COHORT), FakeDownloader(COHORT, fail), max_concurrency=8)
    publisher = ctx.publisher
    assert isinstance(publisher, RecordingPublisher)
    job = submit(ctx, COHORT.study_refs()[:1], source="pacs", output=tmp_path, batch_size=10)
    expand_row(ctx, job, "pacs", publisher.expands.pop()[2])
    result = fetch_batch(ctx, publisher.fetches.pop(0)[0])
    assert result.requeued == 3
    message, countdown = publisher.fetches[-1]  # after the other series' first message
    assert len(message.instances) == 3 and countdown >= 7
    assert ctx.source("pacs").throttle.effective_limit() == 4


def test_window_closed_holds_without_claiming(redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datetime import datetime, timedelta

    now = datetime.now()
    start, end = now + timedelta(hours=2), now + timedelta(hours=3)
    window = f"{start:%H:%M}-{end:%H:%M}"
    downloader = FakeDownloader(COHORT)
    ctx = make_context(redis_db.url, FakeSearcher(COHORT), downloader, window=window)
    publisher = ctx.publisher
    assert isinstance(publisher, RecordingPublisher)
    job = submit(ctx, COHORT.study_refs()[:1], source="pacs", output=tmp_path)
    j, source, row, attempt, _ = publisher.expands.pop()
    result = expand_row(ctx, j, source, row, attempt)
    assert result.retry_in is not None and result.retry_in > 0
    assert publisher.expands[0][4] == result.retry_in  # re-queued with a countdown, nothing searched
    assert ctx.ledger.status(job).expected == 0  # type: ignore[union-attr]
    assert downloader.calls == 0


def test_a_dimse_source_searches_and_fetches_on_one_association(orthanc, redis_db) -> None:  # type: ignore[no-untyped-def]
    """Against a real Orthanc: the C-FIND searcher moves onto the C-GET downloader's association once both exist, and
    its own is released (each open association is a polling thread and a slot the PACS counts)."""
    profile = SourceProfile(
        searcher="dicom-qr",
        downloader="c-get",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
        calling_aet="TROLLEY",
    )
    ctx = EngineContext(
        settings=Settings(sources={"pacs": profile}),
        ledger=Ledger(redis_db.client()),
        publisher=RecordingPublisher(),
    )
    runtime = ctx.source("pacs")
    study_uid = orthanc.cohort.study_refs()[0].study_uid
    study = runtime.searcher.find_study_by_id(study_uid, QueryLevels.INSTANCE)  # no downloader yet: its own
    assert isinstance(runtime.searcher, DICOMQR)
    own = runtime.searcher.associations
    assert own.is_open

    series = study.series[0]
    arrived = list(runtime.downloader.iter_raw(series))
    for _, payload in arrived:
        assert isinstance(payload, Part10File)
        payload.path.unlink()
    assert sorted(ref.instance_uid for ref, _ in arrived) == sorted(i.uid for i in series.instances)
    shared = runtime.downloader.associations  # type: ignore[attr-defined]
    assert runtime.searcher.associations is shared and not own.is_open

    again = runtime.searcher.find_study_by_id(study_uid, QueryLevels.INSTANCE)
    assert [s.uid for s in again.series] == [s.uid for s in study.series]
    assert shared.associations_opened == 1 and shared.is_open  # the fetch's association served the search

    runtime.reset_downloader()  # a transport failure: the next downloader is new, and shared again
    list(runtime.downloader.iter_raw(study.series[1].instances[0]))[0][1].path.unlink()
    assert runtime.searcher.associations is runtime.downloader.associations is not shared
    runtime.close()
