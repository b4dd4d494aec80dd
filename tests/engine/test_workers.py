"""The engine end to end: real ``celery worker`` processes, the real test Redis, the real Orthanc.

Each protocol exports the session cohort with two worker processes; then a worker is SIGKILLed mid-export, a job is
paused and resumed, cancelled, and held outside its window.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.engine.conftest import EngineEnv, Workers
from trolley_tasks.engine.models import JobState

pytestmark = pytest.mark.slow


def stored(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.dcm") if ".trolley" not in p.parts)


def check_complete(out: Path, cohort, identical: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Every instance once, valid, at its study/series/instance path: byte-identical to what was uploaded over
    HTTP; over DIMSE (file meta rebuilt by the receiver, PS3.10 7.1) the same dataset."""
    files = stored(out)
    assert len(files) == len(cohort)
    for item in cohort:
        path = out / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm"
        if identical:
            assert path.read_bytes() == cohort.encode(item)
        else:
            got, want = dcmread(path), cohort.dataset(item)
            assert got.SOPInstanceUID == item.sop_instance_uid and got.PixelData == want.PixelData
    assert not list((out / ".trolley" / "tmp").glob("*")) if (out / ".trolley" / "tmp").exists() else True


@pytest.mark.parametrize("source", ["wado-rs", "wado-uri", "c-get", "c-move"])
def test_export_with_each_protocol(source: str, workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / source
    started = time.monotonic()
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source=source, output=out)
    status = fresh.wait(job)
    elapsed = time.monotonic() - started
    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (18, 18, 0)
    check_complete(out, orthanc.cohort, identical=source.startswith("wado"))
    assert all(s.complete and s.expected == 3 for s in fresh.engine.series(job))
    report = (out / "trolley-report.csv").read_text().splitlines()
    assert len(report) == 19 and all(",done," in line for line in report[1:])
    print(f"\n{source}: {status.done} instances in {elapsed:.2f}s ({status.done / elapsed:.1f} inst/s end to end)")


def test_killed_worker_process_loses_nothing(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fresh.proxy.delay = 0.3  # slow the PACS down so that batches are in flight when the worker dies
    out = tmp_path / "killed"
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=out, batch_size=3)
    fresh.wait(job, until=lambda s: s.done >= 2)
    deadline = time.monotonic() + 30
    while not any(r.state.value == "running" for r in fresh.engine.instances(job)):
        assert time.monotonic() < deadline, "no batch in flight"
        time.sleep(0.01)
    victims = workers.pool()
    for victim in victims:  # both pool processes, so the batch in flight is certainly among the dead
        os.kill(victim.pid, signal.SIGKILL)
    status = fresh.wait(job)
    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (18, 18, 0)
    check_complete(out, orthanc.cohort)
    redelivered = [r for r in fresh.engine.instances(job) if r.redeliveries]
    assert redelivered, "the killed process held a batch; its instances must have come back redelivered"
    print(f"\nkilled {[v.pid for v in victims]}; {len(redelivered)} instances redelivered; all 18 on disk, none twice")


def test_pause_then_resume(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fresh.proxy.delay = 0.1
    out = tmp_path / "paused"
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=out, batch_size=2)
    fresh.wait(job, until=lambda s: s.done >= 1)
    assert fresh.engine.pause(job)
    time.sleep(1.5)  # batches that were running finish; nothing new starts
    held = fresh.engine.status(job)
    time.sleep(1.0)
    assert fresh.engine.status(job).done == held.done < 18
    assert held.state is JobState.PAUSED
    assert fresh.engine.resume(job)
    status = fresh.wait(job)
    assert status.state is JobState.DONE and status.done == 18
    check_complete(out, orthanc.cohort)


def test_cancel_keeps_what_is_done(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fresh.proxy.delay = 0.1
    out = tmp_path / "cancelled"
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=out, batch_size=2)
    fresh.wait(job, until=lambda s: s.done >= 1)
    assert fresh.engine.cancel(job)
    time.sleep(1.5)
    status = fresh.engine.status(job)
    assert status.state is JobState.CANCELLED and status.done < 18
    assert len(stored(out)) == status.done  # every counted instance is a file; nothing else was written
    assert (out / "trolley-report.json").is_file()
    assert not fresh.engine.cancel(job)


def test_window_excluding_now_holds_every_fetch(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="closed", output=tmp_path)
    time.sleep(3)
    status = fresh.engine.status(job)
    assert status.state is JobState.EXPANDING and status.expected == 0 and status.done == 0
    assert fresh.proxy.requests == []  # the PACS saw nothing
    assert not stored(tmp_path)
    fresh.engine.cancel(job)


def test_rerun_same_export_is_same_job_and_fetches_nothing(
    workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=tmp_path)
    fresh.wait(job)
    fetched = [p for p in fresh.proxy.requests if p.startswith("/wado")]
    again = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=tmp_path)
    assert again == job
    status = fresh.wait(job)
    assert status.state is JobState.DONE and status.done == 18
    assert [p for p in fresh.proxy.requests if p.startswith("/wado")] == fetched


def test_rerun_fetches_again_only_what_left_the_output(
    workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=tmp_path)
    fresh.wait(job)
    fetched = [p for p in fresh.proxy.requests if p.startswith("/wado")]
    deleted, cut = orthanc.cohort.instance(0, 0, 0), orthanc.cohort.instance(1, 1, 2)
    (tmp_path / deleted.study_uid / deleted.series_uid / f"{deleted.sop_instance_uid}.dcm").unlink()
    cut_path = tmp_path / cut.study_uid / cut.series_uid / f"{cut.sop_instance_uid}.dcm"
    cut_path.write_bytes(cut_path.read_bytes()[:1000])
    assert fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=tmp_path) == job
    status = fresh.wait(job)
    assert status.state is JobState.DONE and (status.expected, status.done, status.failed) == (18, 18, 0)
    assert status.bytes == sum(len(orthanc.cohort.encode(item)) for item in orthanc.cohort)
    again = [p for p in fresh.proxy.requests if p.startswith("/wado")][len(fetched) :]
    assert sorted(next(u for u in (deleted.sop_instance_uid, cut.sop_instance_uid) if u in p) for p in again) == sorted(
        [deleted.sop_instance_uid, cut.sop_instance_uid]
    )
    check_complete(tmp_path, orthanc.cohort)
