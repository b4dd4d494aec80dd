"""``trolley-tasks workers`` against a real ``celery worker`` on the test broker: the node, its pool, its queues and
the fetch it holds while the (slowed) PACS answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.conftest import EngineEnv, Workers

pytestmark = pytest.mark.slow


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TROLLEY_CONFIG=str(config), COLUMNS="120")
    env.pop("TROLLEY_BROKER__URL", None)
    command = [sys.executable, "-m", "trolley_tasks.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    """The container's health check (workers/healthcheck.py), run as its HEALTHCHECK runs it."""
    env = dict(os.environ, TROLLEY_CONFIG=str(config))
    env.pop("TROLLEY_BROKER__URL", None)
    script = Path(__file__).resolve().parents[2] / "workers" / "healthcheck.py"
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_workers_says_so_when_none_answers(fresh: EngineEnv) -> None:
    # first in the module, before the module's `workers` fixture starts one: nobody listens on the broker yet
    listed = run_cli(fresh.config, "workers", "--json", "--timeout", "0.5")
    if listed.returncode == 0:
        pytest.fail(f"a worker answered although none was started for this test: {listed.stdout}")
    assert listed.returncode == 1
    assert json.loads(listed.stdout) == []
    assert "no worker answered" in listed.stderr
    assert healthcheck(fresh.config).returncode == 1


def test_workers_lists_the_live_worker(workers: Workers, fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    listed = run_cli(fresh.config, "workers", "--json")
    assert listed.returncode == 0, listed.stderr
    (node,) = json.loads(listed.stdout)
    assert node["host"] == socket.gethostname()
    assert node["pid"] == workers.process.pid
    assert node["processes"] == 2
    assert node["queues"] == ["trolley.expand", "trolley.fetch"]
    healthy = healthcheck(fresh.config)
    assert healthy.returncode == 0 and node["name"] in healthy.stdout, healthy.stdout + healthy.stderr

    fresh.proxy.delay = 0.5  # a fetch stays in hand long enough to be seen
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="proxied", output=tmp_path / "out", batch_size=3)
    deadline = time.monotonic() + 60
    held: list[str] = []
    while not held:
        assert time.monotonic() < deadline, "no worker reported a task in hand"
        (node_now,) = fresh.engine.workers(timeout=1.0)
        held = [line for line in node_now.active if line.startswith("trolley.fetch")]
    assert f"job={job}" in held[0] and "source=proxied" in held[0] and "instances=3" in held[0], held

    table = run_cli(fresh.config, "workers")
    assert table.returncode == 0, table.stderr
    assert node["name"] in table.stdout and "trolley.fetch" in table.stdout
    assert fresh.wait(job).done == 18
