"""``make bench BENCH_SIZE=smoke`` works: it runs to the end, prints the tables, writes its JSON, and every download
of every run was verified (every instance present, valid, the one asked for). No figure is asserted: the machine is
shared, and the bench is there to measure, not to pass or fail on speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.orthanc import OrthancUnavailable, find_orthanc
from tests.conftest import service_missing

pytestmark = [pytest.mark.slow, pytest.mark.pacs, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent


def test_the_smoke_bench_runs_and_verifies_every_download(tmp_path: Path) -> None:
    try:
        find_orthanc()
    except OrthancUnavailable as exc:
        service_missing(str(exc))
    env = {key: value for key, value in os.environ.items() if not key.startswith("TROLLEY_")}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "smoke", "--results", str(tmp_path), "--no-docs"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "### Targets (issue 12)" in result.stdout and "| P1 wado-rs: trolley-tasks / reference |" in result.stdout
    assert "### Every run" in result.stdout
    files = list(tmp_path.glob("*-smoke.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())
    kinds = {(run["kind"], run["protocol"], run["network"]) for run in results["runs"]}
    assert {("reference", "wado-rs", "loopback"), ("trolley-tasks", "wado-rs", "loopback")} <= kinds
    assert ("trolley-tasks", "wado-rs", "10 ms") in kinds
    for run in results["runs"]:
        verified = run["verified"]
        assert verified["ok"] and verified["verified"] == verified["expected"] > 0, run
    assert results["probe"]["expected"] > 0
    assert results["relay_check"]["kept_alive_relayed_ms"] > 0
