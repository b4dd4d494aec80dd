"""Memory stays flat in cohort size: expanding a synthetic 100,000-instance cohort (fake searcher, real Redis
broker and ledger, no workers consuming) keeps the producer under 200 MB RSS and Redis under 500 bytes per queued
instance (ledger records and fetch messages together). Runs in a subprocess so the figure is the producer's own; the
probe is ``testbed/memory_probe.py``, which ``make bench`` runs too."""

from __future__ import annotations

import pytest

from testbed.memory_probe import run_probe

pytestmark = pytest.mark.slow


def test_expanding_100k_instances_keeps_memory_flat(redis_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    figures = run_probe(redis_db.broker_url, redis_db.url, str(tmp_path), 100, 10, 100)
    print(f"\nmemory: {figures}")
    assert figures["expected"] == 100_000 and figures["fetch_messages"] == 2_000
    assert figures["rss_mb"] < 200
    assert figures["redis_bytes_per_instance"] < 500
