"""The retry table, the global throttle and retry-failed under real workers, against a private Orthanc behind a
local fault-injecting, request-counting proxy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.cohort import generate_cohort
from tests.engine.conftest import FAST_RETRY, EngineEnv, Workers, celery_workers
from tests.engine.proxy import Fault, PacsProxy
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.settings import load_settings

pytestmark = pytest.mark.slow

COHORT = generate_cohort(studies=2, series=2, instances=3, seed=23, rows=256, columns=256)  # 128 KB: parts stream
SERIES = [ref.series_uid for ref in COHORT.series_refs()]


@pytest.fixture(scope="module")
def private(orthanc_factory, redis_service, tmp_path_factory) -> Iterator[tuple[EngineEnv, object]]:  # type: ignore[no-untyped-def]
    pacs = orthanc_factory(COHORT)
    tmp = tmp_path_factory.mktemp("faults")
    proxy = PacsProxy(pacs.url).start()
    config = tmp / "trolley.toml"
    config.write_text(
        f"""
state_dir = "{tmp / "state"}"
[broker]
url = "{redis_service.broker_url}"
[sources.direct]
url = "{pacs.dicomweb_url}"
[sources.faulty]
url = "{proxy.url}/dicom-web"
[sources.throttled]
downloader = "wado-uri"
url = "{proxy.url}/dicom-web"
wado_uri_url = "{proxy.url}/wado"
max_concurrency = 2
"""
        + FAST_RETRY.format(name="faulty")
    )
    yield EngineEnv(load_settings(config), config, proxy, tmp), pacs
    proxy.stop()


@pytest.fixture(scope="module")
def four_workers(private) -> Iterator[Workers]:  # type: ignore[no-untyped-def]
    env, _ = private
    with celery_workers(env.config, 4, env.tmp) as running:
        yield running


@pytest.fixture
def env(private, redis_service, four_workers: Workers) -> EngineEnv:  # type: ignore[no-untyped-def]
    environment, _ = private
    client = redis_service.client()
    for key in client.scan_iter("trolley:*", count=1000):
        client.delete(key)
    environment.proxy.faults.clear()
    environment.proxy.delay = 0.0
    environment.proxy.max_in_flight = 0
    environment.proxy.requests.clear()
    return environment


def export(env: EngineEnv, out: Path, source: str = "faulty", cohort: object = None, **kwargs: object) -> str:
    refs = cohort if cohort is not None else COHORT.study_refs()
    return env.engine.submit(refs, source=source, output=out, **kwargs)  # type: ignore[arg-type]


def records(env: EngineEnv, job: str, series_uid: str) -> list:  # type: ignore[type-arg]
    return [r for r in env.engine.instances(job) if r.series_uid == series_uid]


def test_503_with_retry_after_and_500_are_retried_then_succeed(env: EngineEnv, tmp_path: Path) -> None:
    busy = Fault(f"/series/{SERIES[0]}", status=503, times=2, retry_after="1")
    failing = Fault(f"/series/{SERIES[1]}", status=500, times=2)
    env.proxy.faults += [busy, failing]
    started = time.monotonic()
    status = env.wait(export(env, tmp_path))
    assert status.state is JobState.DONE and status.done == 12
    assert busy.served == 2 and failing.served == 2
    assert time.monotonic() - started >= 2  # two Retry-After: 1 waits, honoured
    job = status.job_id
    assert {r.attempts for r in records(env, job, SERIES[1])} == {3}  # 500 counts every try
    assert {r.attempts for r in records(env, job, SERIES[0])} == {1}  # Retry-After held the source: only the success


def test_404_fails_at_once(env: EngineEnv, tmp_path: Path) -> None:
    missing = Fault(f"/series/{SERIES[2]}", status=404, times=-1)
    env.proxy.faults.append(missing)
    status = env.wait(export(env, tmp_path))
    assert status.state is JobState.DONE_WITH_FAILURES
    assert (status.done, status.failed, status.failures_by_class) == (9, 3, {"not-found": 3})
    assert missing.served == 1 and {r.attempts for r in records(env, status.job_id, SERIES[2])} == {1}


def test_401_pauses_the_job_until_resumed(env: EngineEnv, tmp_path: Path) -> None:
    env.proxy.faults.append(Fault("/dicom-web/", status=401, times=-1, suffix=False))
    job = export(env, tmp_path)
    status = env.wait(job, until=lambda s: s.state is JobState.PAUSED, timeout=60)
    assert status.pause_reason.startswith("auth") and status.failed == 0
    env.proxy.faults.clear()  # the credentials were fixed
    assert env.engine.resume(job)
    status = env.wait(job)
    assert status.state is JobState.DONE and status.done == 12


def test_truncated_multipart_is_retried_then_quarantined(env: EngineEnv, tmp_path: Path) -> None:
    cut = Fault(f"/series/{SERIES[3]}", truncate=True, times=-1)
    env.proxy.faults.append(cut)
    status = env.wait(export(env, tmp_path))
    assert status.state is JobState.DONE_WITH_FAILURES and status.done + status.failed == 12
    failed = [r for r in records(env, status.job_id, SERIES[3]) if r.state.value == "failed"]
    assert failed and all(r.error_class == "payload-invalid" and r.attempts == 3 for r in failed)
    assert cut.served == 3
    # the instance cut in the middle, kept for a person, out of the export tree
    assert list((tmp_path / ".trolley" / "quarantine").glob("*.bad"))


def test_throttle_caps_concurrency_across_four_worker_processes(env: EngineEnv, tmp_path: Path) -> None:
    env.proxy.delay = 0.05  # long enough for requests of different processes to overlap without a cap
    status = env.wait(export(env, tmp_path, source="throttled", batch_size=1))
    assert status.state is JobState.DONE and status.done == 12
    assert 1 <= env.proxy.max_in_flight <= 2


def test_retry_failed_after_the_server_is_fixed(private, env: EngineEnv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, pacs = private
    gone = COHORT.instance(1, 0, 1)
    pacs.server.delete_instance(gone.sop_instance_uid)
    try:
        # the cohort names every instance (an instance-level cohort): one the server lacks is a failure, not a
        # silently shorter export
        status = env.wait(export(env, tmp_path, source="direct", cohort=COHORT.instance_refs()))
        assert status.state is JobState.DONE_WITH_FAILURES and status.failed == 1
        [failure] = list(env.engine.failures(status.job_id))
        assert failure.instance_uid == gone.sop_instance_uid and failure.error_class == "not-found"
    finally:
        pacs.server.upload([COHORT.encode(gone)])
    assert env.engine.retry_failed(status.job_id) == 1
    status = env.wait(status.job_id)
    assert status.state is JobState.DONE and (status.done, status.failed) == (12, 0)
    assert (tmp_path / gone.study_uid / gone.series_uid / f"{gone.sop_instance_uid}.dcm").is_file()
