"""``trolley-tasks metrics`` scraped during a real export: real workers, the real Orthanc (behind the counting proxy,
slowed down so that the export is still running between scrapes), the real test Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from testbed.orthanc import free_port
from tests.engine.conftest import EngineEnv, Workers, cli_service
from tests.engine.proxy import Fault
from trolley_tasks.engine.models import JobState

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextmanager
def metrics_server(config: Path, log: Path) -> Iterator[str]:
    """``trolley-tasks metrics`` on a free loopback port; yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with cli_service(["metrics", "--port", str(port)], config, log, url):
        yield url


def scrape(url: str) -> Samples:
    answer = requests.get(url, timeout=10)
    answer.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), -1.0)


def test_metrics_move_during_an_export(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fresh.proxy.delay = 0.2  # each request takes a while: the export is still running between scrapes
    with metrics_server(fresh.config, tmp_path / "metrics.log") as url:
        idle = scrape(url)
        assert value(idle, "trolley_ledger_up") == 1
        assert value(idle, "trolley_source_max_concurrency", source="proxied") == 8
        assert value(idle, "trolley_source_breaker_state", source="proxied", state="closed") == 1

        job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=tmp_path / "out", batch_size=2)
        seen_done: list[float] = []
        seen_slots: list[float] = []
        seen_queued: list[float] = []
        while not fresh.engine.status(job).state.ended:
            samples = scrape(url)
            seen_done.append(value(samples, "trolley_job_instances", job=job, source="proxied", status="done"))
            seen_slots.append(value(samples, "trolley_source_slots_in_use", source="proxied"))
            seen_queued.append(value(samples, "trolley_queue_messages", queue="trolley.fetch"))
        status = fresh.wait(job)
        final = scrape(url)

    assert status.state is JobState.DONE, status
    assert value(final, "trolley_job_instances", job=job, source="proxied", status="expected") == 18
    assert value(final, "trolley_job_instances", job=job, source="proxied", status="done") == 18
    assert value(final, "trolley_job_instances", job=job, source="proxied", status="failed") == 0
    assert value(final, "trolley_job_bytes", job=job, source="proxied") == status.bytes > 0
    assert value(final, "trolley_job_state", job=job, source="proxied", state="done") == 1
    assert value(final, "trolley_source_slots_in_use", source="proxied") == 0
    assert value(final, "trolley_queue_messages", queue="delayed") == 0
    # the values moved while the export ran: done went up through values below 18, slots were held at some point
    assert any(0 <= done < 18 for done in seen_done), seen_done
    assert seen_done == sorted(seen_done), seen_done
    assert max(seen_slots) >= 1, seen_slots
    assert all(queued >= 0 for queued in seen_queued), seen_queued
    print(f"\n{len(seen_done)} scrapes; done took {sorted(set(seen_done))}; slots in use {sorted(set(seen_slots))}")


def test_failures_by_error_class(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series = orthanc.cohort.series_refs()[0].series_uid
    fresh.proxy.faults.append(Fault(f"/series/{series}", status=404, times=-1))
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied-rs", output=tmp_path / "out")
    status = fresh.wait(job)
    with metrics_server(fresh.config, tmp_path / "metrics.log") as url:
        samples = scrape(url)
    assert (status.done, status.failed) == (15, 3), status
    labels = {"job": job, "source": "proxied-rs"}
    assert value(samples, "trolley_job_failed_instances", error_class="not-found", **labels) == 3
    assert value(samples, "trolley_job_instances", status="failed", **labels) == 3
    assert value(samples, "trolley_job_state", state="done-with-failures", **labels) == 1
