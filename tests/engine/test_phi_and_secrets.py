"""No secret and no patient data in what leaves the ledger's row store: task messages, task events, Flower's API,
Redis keys and values, worker logs at DEBUG, and the reports (issue 11).

Two exports BY PatientID (the search cohort that used to carry the value in every expansion message) run through
real workers against an Orthanc that requires a password: one by QIDO-RS and WADO-RS, one by C-FIND and C-GET.
Meanwhile every Redis key and value is sampled and every task event captured. Each secret and each patient value is
then looked for in raw, URL-encoded, JSON-escaped and base64 forms. The one place allowed to hold the searched
values is each job's row store (``trolley:{J}:rowdata``): the search must be able to run. It is asserted to be the
only one.

The libraries log values of their own: pynetdicom writes every C-FIND identifier at INFO, and pydicom names a value
that fails its validation in a warning. The cohort's birth dates are written with dashes, as some PACS keep them
(DICOM's DA has none), so that a warning would carry one.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import DataElement, Dataset, config

from testbed.cohort import GeneratedCohort, GeneratedInstance
from tests.engine.conftest import EngineEnv, celery_workers
from tests.engine.test_flower import PASSWORD as FLOWER_PASSWORD
from tests.engine.test_flower import USER as FLOWER_USER
from tests.engine.test_flower import flower_server
from trolley_tasks.core import Query
from trolley_tasks.engine.api import EngineClient
from trolley_tasks.engine.models import JobState
from trolley_tasks.engine.settings import load_settings

pytestmark = pytest.mark.slow

PASSWORD = "pw-9f3K-trolley-s3cret"
TOKEN = "tok-7c1a-never-logged"
VITREA = "vitrea-Zq8-hush"
BIRTH_DATE = "1961-07-14"


class LegacyValuesCohort(GeneratedCohort):
    """The generated cohort, with a PatientBirthDate that does not conform to DA (pydicom's validation rejects it)."""

    def dataset(self, item: GeneratedInstance) -> Dataset:
        ds = super().dataset(item)
        ds[0x00100030] = DataElement(0x00100030, "DA", BIRTH_DATE, validation_mode=config.IGNORE)
        return ds


COHORT = LegacyValuesCohort(studies=2, series=2, instances=3, seed=41, rows=16, columns=16)


def forms(value: str) -> set[str]:
    """The spellings a value could leak in."""
    return {
        value,
        urllib.parse.quote(value),
        urllib.parse.quote_plus(value),
        json.dumps(value)[1:-1],
        base64.b64encode(value.encode()).decode(),
    }


class Background:
    """A daemon thread running ``_run`` for the life of a ``with`` block; ``_stop`` tells it to end."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class RedisSampler(Background):
    """Every key and value seen in Redis while the export runs (the broker's queues and unacked messages too)."""

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.client = client
        self.seen: dict[str, set[str]] = {}

    def _values(self, key: bytes) -> Iterator[bytes]:
        kind = self.client.type(key)
        if kind == b"string":
            yield self.client.get(key) or b""
        elif kind == b"hash":
            for field, value in self.client.hgetall(key).items():
                yield field
                yield value
        elif kind == b"list":
            yield from self.client.lrange(key, 0, -1)
        elif kind == b"set":
            yield from self.client.smembers(key)
        elif kind == b"zset":
            yield from self.client.zrange(key, 0, -1)

    def sample(self) -> None:
        for key in self.client.scan_iter(count=1000):
            bucket = self.seen.setdefault(key.decode(errors="replace"), set())
            for value in self._values(key):
                bucket.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()  # the last state, after the job ended


class EventCapture(Background):
    """Every Celery task event (what Flower stores and shows), as JSON text."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.app = app
        self.events: list[str] = []

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            receiver = self.app.events.Receiver(connection, handlers={"*": lambda e: self.events.append(json.dumps(e))})
            while not self._stop.is_set():
                try:
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)
                except TimeoutError:
                    continue

    def __enter__(self) -> EventCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def flower_api(url: str) -> str:
    """What Flower's API tells anyone with its password: tasks (names, arguments, results) and workers."""
    import requests

    pages = []
    for path in ("/api/tasks", "/api/workers", "/api/task/types"):
        deadline = time.monotonic() + 20
        while True:  # Flower folds events in on its own clock: wait until it has our tasks
            answer = requests.get(url + path, auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=10)
            answer.raise_for_status()
            if path != "/api/tasks" or "trolley.fetch" in answer.text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        pages.append(answer.text)
    return "\n".join(pages)


def test_exports_by_patient_id_leak_no_secret_and_no_patient_data(  # type: ignore[no-untyped-def]
    orthanc_factory, redis_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pacs = orthanc_factory(COHORT, users={"trolley": PASSWORD})
    for name, value in (("TT_PACS_PASSWORD", PASSWORD), ("TT_TOKEN", TOKEN), ("TT_VITREA_PASSWORD", VITREA)):
        monkeypatch.setenv(name, value)
    config = tmp_path / "trolley.toml"
    config.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[broker]
url = "{redis_service.broker_url}"
[engine]
sweep_interval = 0.5
[sources.pacs]
url = "{pacs.dicomweb_url}"
[sources.pacs.auth]
type = "basic"
username = "trolley"
password_env = "TT_PACS_PASSWORD"
[sources.bearer]
url = "{pacs.dicomweb_url}"
[sources.bearer.auth]
type = "bearer"
token_env = "TT_TOKEN"
[sources.vitrea]
url = "{pacs.dicomweb_url}"
[sources.vitrea.auth]
type = "vitrea"
username = "trolley"
password_env = "TT_VITREA_PASSWORD"
login_url = "{pacs.url}/login"
[sources.dimse]
searcher = "dicom-qr"
downloader = "c-get"
host = "127.0.0.1"
port = {pacs.dicom_port}
called_aet = "{pacs.aet}"
calling_aet = "TROLLEY"
"""
    )
    client = redis_service.client()
    for key in client.scan_iter("trolley*", count=1000):
        client.delete(key)
    settings = load_settings(config)
    first = next(iter(COHORT))
    out, out_dimse = tmp_path / "out", tmp_path / "out-dimse"
    with (
        celery_workers(config, 2, tmp_path, loglevel="debug") as workers,
        flower_server(config, tmp_path / "flower.log") as flower,
    ):
        env = EngineEnv(settings, config, None, tmp_path)  # type: ignore[arg-type]
        engine: EngineClient = env.engine
        redis_seen, events = RedisSampler(client), EventCapture(engine.app)
        with redis_seen, events:
            job = engine.submit(Query(PatientID=first.patient_id), source="pacs", output=out)
            status = env.wait(job, timeout=180)
            job_dimse = engine.submit(Query(PatientID=first.patient_id), source="dimse", output=out_dimse)
            status_dimse = env.wait(job_dimse, timeout=180)
        engine.close()
        log_text = workers.log.read_text(errors="replace")
        flower_pages = flower_api(flower)
    assert status.state is JobState.DONE and status.done == 6, status
    assert status_dimse.state is JobState.DONE and status_dimse.done == 6, status_dimse
    assert events.events and any("trolley.fetch" in e for e in events.events)  # the capture saw our tasks
    assert "DEBUG" in log_text and "GET /dicom-web" in log_text  # the log really is at DEBUG, requests included
    assert "Sending Find Request" in log_text  # and so do pynetdicom's records of the C-FIND
    row_stores = {f"trolley:{{{j}}}:rowdata" for j in (job, job_dimse)}
    for row_store in row_stores:  # where the searched value must be
        assert any(first.patient_id in value for value in redis_seen.seen.get(row_store, ())), row_store
    reports = "".join(
        (folder / name).read_text()
        for folder in (out, out_dimse)
        for name in ("trolley-report.json", "trolley-report.csv")
    )
    assert "trolley.fetch" in flower_pages  # Flower saw our tasks
    places = {
        "task events": "\n".join(events.events),
        "Flower's API": flower_pages,
        "worker log at DEBUG": log_text,
        "reports": reports,
    }
    for key, values in redis_seen.seen.items():
        if key not in row_stores:
            places[f"redis {key}"] = key + "\n" + "\n".join(values)
    secrets_and_phi = {
        "password": PASSWORD,
        "token": TOKEN,
        "vitrea password": VITREA,
        "Flower password": FLOWER_PASSWORD,
        "PatientID": first.patient_id,
        "PatientName": first.patient_name,
        "AccessionNumber": first.accession_number,
        "PatientBirthDate": BIRTH_DATE,
    }
    leaks = [
        f"{what} in {place}"
        for what, value in secrets_and_phi.items()
        for form in forms(value)
        for place, text in places.items()
        if form in text
    ]
    assert not leaks, leaks
    assert len(places) > 10  # the sampler saw the ledger and the broker's keys, not an empty Redis
