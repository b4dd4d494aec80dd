"""``trolley-tasks flower`` against the test Redis and a real worker: Flower finds our tasks, by readable name, with
arguments that say what they do (job, source, series, how many instances) and carry neither a secret nor a patient
value; and a headless Chromium screenshot of its task page.

``TROLLEY_SCREENSHOT=docs/flower.png`` also writes the screenshot there (how the README's image is made).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from testbed.orthanc import free_port
from tests.conftest import service_missing
from tests.engine.conftest import EngineEnv, Workers, cli_service
from trolley_tasks import Query
from trolley_tasks.engine.models import JobState

pytestmark = pytest.mark.slow

USER, PASSWORD = "trolley", "flower-test-password-7c1e"


@contextmanager
def flower_server(config: Path, log: Path) -> Iterator[str]:
    """Flower on a free loopback port with basic auth (password from the environment, never the command line)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"FLOWER_PASSWORD": PASSWORD, "FLOWER_BASIC_AUTH": None}
    with cli_service(["flower", "--port", str(port)], config, log, f"{url}/healthcheck", env):
        # Flower answers its health check before its event consumer is connected; an event sent before that is
        # lost (a task then shows without a name). kombu logs "Connected to" just before it subscribes.
        deadline = time.monotonic() + 30
        while b"Connected to " not in log.read_bytes():
            assert time.monotonic() < deadline, f"Flower's event consumer did not connect:\n{log.read_text()[-2000:]}"
            time.sleep(0.05)
        yield url


def flower_tasks(url: str) -> dict[str, dict]:  # type: ignore[type-arg]
    answer = requests.get(f"{url}/api/tasks", auth=(USER, PASSWORD), timeout=10)
    answer.raise_for_status()
    tasks: dict[str, dict] = answer.json()  # type: ignore[type-arg]
    return tasks


def screenshot(url: str, target: Path) -> None:
    """Flower's task page through Debian's chromium, headless, with a throw-away profile."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        service_missing("chromium is not installed (apt-get install -y chromium)")
        return
    authed = url.replace("http://", f"http://{USER}:{PASSWORD}@") + "/tasks"
    with tempfile.TemporaryDirectory(prefix="trolley-chromium-") as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=5000",
            f"--screenshot={target}", authed,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert target.is_file() and target.stat().st_size > 10_000, done.stderr[-2000:]
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flower_shows_our_tasks_readably(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    patient = next(iter(orthanc.cohort))
    with flower_server(fresh.config, tmp_path / "flower.log") as url:
        assert requests.get(f"{url}/api/tasks", timeout=10).status_code == 401  # basic auth is on
        # by PatientID: the one cohort kind whose row is patient data, which must not reach Flower
        job = fresh.engine.submit(Query(PatientID=patient.patient_id), source="wado-rs", output=tmp_path / "out")
        status = fresh.wait(job)
        assert status.state is JobState.DONE and status.done == 6, status
        deadline = time.monotonic() + 30
        while True:  # Flower learns from task events, shortly after the job ends
            tasks = flower_tasks(url)
            names = {task["name"] for task in tasks.values()}
            if {"trolley.fetch", "trolley.expand_study", "trolley.finalize"} <= names:
                break
            assert time.monotonic() < deadline, f"Flower saw only {names}"
            time.sleep(0.2)
        fetches = [task for task in tasks.values() if task["name"] == "trolley.fetch"]
        assert fetches and all(task["state"] == "SUCCESS" for task in fetches)
        series_uids = {item.series_uid for item in orthanc.cohort if item.patient_id == patient.patient_id}
        for task in fetches:
            shown = task["kwargs"]
            assert f"'job': '{job}'" in shown and "'source': 'wado-rs'" in shown, shown
            assert "'instances': 3" in shown, shown  # a count, not a list of UIDs
            assert any(f"'series': '{uid}'" in shown for uid in series_uids), shown
        (finalize,) = [task for task in tasks.values() if task["name"] == "trolley.finalize"]
        assert finalize["kwargs"] == repr({"job": job})
        everything = json.dumps(tasks)
        for value in (patient.patient_id, patient.patient_name, patient.accession_number, PASSWORD, orthanc.url):
            assert value not in everything, f"{value!r} reached Flower"
        print("\n" + "\n".join(sorted(f"{t['name']}: {t['kwargs']}" for t in tasks.values())))

        target = tmp_path / "flower.png"
        screenshot(url, target)
        if os.environ.get("TROLLEY_SCREENSHOT"):
            shutil.copyfile(target, os.environ["TROLLEY_SCREENSHOT"])
