"""``trolley-tasks metrics``: a Prometheus endpoint that reads the ledger on every scrape.

Nothing is counted in this process: each scrape asks the engine (through :class:`EngineClient`) for every job's
counters, every source's throttle and breaker, and the queue lengths, and turns them into gauges. So the endpoint can
restart, or run on any host that reaches the Redis, and still tells the truth; two of them tell the same truth.
Every value is a gauge: the ledger's counters go down as well as up (``retry-failed`` moves failed instances back to
pending), which a Prometheus counter must never do.

A scrape that cannot read the Redis answers ``trolley_ledger_up 0`` and nothing else, instead of an HTTP error, so that
an alert can tell "the ledger is down" from "the metrics process is down".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated

import typer
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trolley_tasks.cli.common import handles_errors, log, notice, start
from trolley_tasks.cli.services import require_broker
from trolley_tasks.engine.api import EngineClient
from trolley_tasks.engine.models import JobState

BREAKER_STATES = ("closed", "half-open", "open")


class LedgerCollector(Collector):
    """Gauges from the ledger, built fresh on each scrape (prometheus-client's custom-collector model)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("trolley_ledger_up", "1 when this scrape could read the ledger and the broker")
        try:
            families = list(self._families())
        except Exception as exc:  # noqa: BLE001 - any failure to read becomes trolley_ledger_up 0, logged
            log.warning("metrics scrape could not read the ledger: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        jobs = self.engine.jobs()
        instances = GaugeMetricFamily(
            "trolley_job_instances",
            "Instances of a job by status: expected, done (verified on disk), skipped (part of done: found on disk), "
            "failed",
            labels=["job", "source", "status"],
        )
        failed = GaugeMetricFamily(
            "trolley_job_failed_instances",
            "Failed instances and rows of a job by error class",
            labels=["job", "source", "error_class"],
        )
        size = GaugeMetricFamily("trolley_job_bytes", "Bytes written for a job", labels=["job", "source"])
        state = GaugeMetricFamily(
            "trolley_job_state", "1 for the job's current state", labels=["job", "source", "state"]
        )
        for job in jobs:
            for name in ("expected", "done", "skipped", "failed"):
                instances.add_metric([job.job_id, job.source, name], getattr(job, name))
            for error_class, count in sorted(job.failures_by_class.items()):
                failed.add_metric([job.job_id, job.source, error_class], count)
            size.add_metric([job.job_id, job.source], job.bytes)
            for value in JobState:
                state.add_metric([job.job_id, job.source, value.value], int(job.state is value))
        yield from (instances, failed, size, state)

        limit = GaugeMetricFamily("trolley_source_max_concurrency", "Configured max_concurrency", labels=["source"])
        effective = GaugeMetricFamily(
            "trolley_source_effective_concurrency",
            "The throttle's current limit (AIMD: halved by server-busy answers, grown back by clean fetches)",
            labels=["source"],
        )
        in_use = GaugeMetricFamily(
            "trolley_source_slots_in_use", "Throttle slots held now, across all hosts", labels=["source"]
        )
        breaker = GaugeMetricFamily(
            "trolley_source_breaker_state", "1 for the source's current breaker state", labels=["source", "state"]
        )
        waits = GaugeMetricFamily(
            "trolley_source_throttle_waits",
            "Times work waited for the source's throttle: for a concurrency slot, or for rate-limit tokens",
            labels=["source", "kind"],
        )
        waited = GaugeMetricFamily(
            "trolley_source_throttle_wait_seconds", "Seconds spent waiting for the throttle", labels=["source", "kind"]
        )
        for health in self.engine.source_health():
            limit.add_metric([health.name], health.max_concurrency)
            effective.add_metric([health.name], health.effective_concurrency)
            in_use.add_metric([health.name], health.slots_in_use)
            for breaker_state in BREAKER_STATES:
                breaker.add_metric([health.name, breaker_state], int(health.breaker == breaker_state))
            for kind in ("slot", "rate"):
                waits.add_metric([health.name, kind], health.waits.get(kind, 0.0))
                waited.add_metric([health.name, kind], health.waits.get(f"{kind}_seconds", 0.0))
        yield from (limit, effective, in_use, breaker, waits, waited)

        queues = GaugeMetricFamily(
            "trolley_queue_messages",
            "Messages waiting: trolley.fetch and trolley.expand in the broker, delayed in trolley:delayed",
            labels=["queue"],
        )
        for name, length in self.engine.queue_lengths().items():
            queues.add_metric([name], length)
        yield queues


@handles_errors
def metrics(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="Port to serve on.")] = 9808,
    address: Annotated[
        str, typer.Option("--address", metavar="HOST", help="Listen address (0.0.0.0 to let another host scrape).")
    ] = "127.0.0.1",
) -> None:
    """Serve Prometheus metrics read from the ledger: per job and source, throttle, breaker, queues.

    Example:

    \b
        trolley-tasks metrics --port 9808     # then scrape http://127.0.0.1:9808/metrics
    """
    settings = start(ctx)
    require_broker(settings, "metrics")
    engine = EngineClient(settings)
    collector = LedgerCollector(engine)
    REGISTRY.register(collector)
    server, thread = start_http_server(port, addr=address, registry=REGISTRY)
    notice(f"metrics on http://{address}:{port}/metrics")
    try:
        threading.Event().wait()  # until Ctrl-C or SIGTERM; the server thread answers scrapes
    finally:
        server.shutdown()
        thread.join(timeout=5)
        REGISTRY.unregister(collector)
        engine.close()
