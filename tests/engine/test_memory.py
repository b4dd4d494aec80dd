"""Memory stays flat in cohort size: expanding a synthetic 100,000-instance cohort (fake searcher, real Redis
broker and ledger, no workers consuming) keeps the producer under 200 MB RSS and Redis under 500 bytes per queued
instance (ledger records and fetch messages together). Runs in a subprocess so the figure is the producer's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROBE = r"""
import json, resource, sys
from trolley_tasks.profiles import SourceProfile
from trolley_tasks.engine.settings import BrokerConfig, Settings
from trolley_tasks.core import Instance, QueryLevels, Series, Study, StudyReference
from trolley_tasks.engine.celery_app.app import make_app
from trolley_tasks.engine.context import EngineContext, redis_client
from trolley_tasks.engine.expand import expand_row
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.producer import submit
from trolley_tasks.engine.celery_app.publisher import CeleryPublisher
from trolley_tasks.searchers.base import SearcherBase

broker, ledger_url, out = sys.argv[1:4]
STUDIES, SERIES, INSTANCES = 100, 10, 100
ROOT = "1.2.826.0.1.3680043.8.498.77"

class Synthetic(SearcherBase):
    def find_study_by_id(self, uid, query_level=QueryLevels.STUDY):
        study = Study(uid)
        for se in range(SERIES):
            series = study.add_series(Series(f"{uid}.{se + 1}"))
            for i in range(INSTANCES):
                series.add_instance(Instance(f"{uid}.{se + 1}.{i + 1}"))
        return study

class NoDownloads:
    whole_series = False  # expansion asks; nothing is fetched in this probe

client = redis_client(ledger_url)
before = client.info("memory")["used_memory"]
settings = Settings(broker=BrokerConfig(url=broker),
                    sources={"pacs": SourceProfile(downloader="wado-uri", url="http://127.0.0.1:9/d",
                                                   wado_uri_url="http://127.0.0.1:9/wado")})
ctx = EngineContext(settings=settings, ledger=Ledger(client), publisher=CeleryPublisher(make_app(settings)),
                    build_clients=lambda p, n: (Synthetic, NoDownloads))
studies = [StudyReference(f"{ROOT}.{st + 1}") for st in range(STUDIES)]
job = submit(ctx, studies, source="pacs", output=out)
for row in list(ctx.ledger.r.smembers(ctx.ledger.key(job, "rows"))):
    expand_row(ctx, job, "pacs", row.decode())
status = ctx.ledger.status(job)
after = client.info("memory")["used_memory"]
queued = client.llen("trolley.fetch")
print(json.dumps({"expected": status.expected, "fetch_messages": queued,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "redis_bytes_per_instance": (after - before) / status.expected}))
"""


def test_expanding_100k_instances_keeps_memory_flat(redis_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, redis_db.broker_url, redis_db.url, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nmemory: {figures}")
    assert figures["expected"] == 100_000 and figures["fetch_messages"] == 2_000
    assert figures["rss_mb"] < 200
    assert figures["redis_bytes_per_instance"] < 500
