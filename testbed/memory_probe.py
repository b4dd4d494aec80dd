"""The memory probe of the engine's producer and ledger (P3 of the performance issue), shared by
``tests/engine/test_memory.py`` and ``make bench``.

Expanding a synthetic cohort (a fake searcher that answers STUDIES x SERIES x INSTANCES, the real Redis broker and
ledger, no workers consuming) in a fresh process, so that the RSS is the producer's own. It prints one JSON line:
instances expected, fetch messages queued, the producer's peak RSS in MB, and Redis bytes per queued instance (ledger
records and fetch messages together)::

    python -m testbed.memory_probe BROKER_URL LEDGER_URL OUT_DIR 100 10 100
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

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
STUDIES, SERIES, INSTANCES = (int(n) for n in sys.argv[4:7])
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


def run_probe(broker_url: str, ledger_url: str, out: str, studies: int, series: int, instances: int) -> dict[str, Any]:
    """Run the probe in a fresh interpreter; its JSON figures, or RuntimeError with its stderr."""
    command = [sys.executable, "-c", PROBE, broker_url, ledger_url, out, str(studies), str(series), str(instances)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the memory probe failed:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


if __name__ == "__main__":
    print(json.dumps(run_probe(*sys.argv[1:4], *(int(n) for n in sys.argv[4:7]))))
