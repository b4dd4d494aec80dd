"""RabbitMQ as the broker (the ledger stays in Redis): run when TROLLEY_TEST_AMQP_URL is set, for example
``TROLLEY_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5672// make test``. Under CI=true it must be set (``.ci/run``
sets it, and starts RabbitMQ when none answers): a missing broker fails the run there, never skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import service_missing
from tests.engine.conftest import EngineEnv, celery_workers
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.settings import load_settings

AMQP_URL = os.environ.get("TROLLEY_TEST_AMQP_URL", "")

pytestmark = pytest.mark.slow


def test_export_over_rabbitmq(orthanc, redis_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not AMQP_URL:
        service_missing("set TROLLEY_TEST_AMQP_URL to test RabbitMQ as the broker")
    config = tmp_path / "trolley.toml"
    config.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[broker]
url = "{AMQP_URL}"
ledger_url = "{redis_db.url}"
[sources.pacs]
url = "{orthanc.dicomweb_url}"
"""
    )
    settings = load_settings(config)
    with celery_workers(config, 2, tmp_path):
        env = EngineEnv(settings, config, None, tmp_path)  # type: ignore[arg-type]
        job = env.engine.submit(orthanc.cohort.study_refs(), source="pacs", output=tmp_path / "out")
        status = env.wait(job)
        env.engine.close()
    assert status.state is JobState.DONE and (status.expected, status.done) == (18, 18)
    assert len([p for p in (tmp_path / "out").rglob("*.dcm") if ".trolley" not in p.parts]) == 18
