"""The compose file's one-shot ``cohort`` service (``python -m testbed.load``) against a real, empty Orthanc."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import requests


def test_loader_fills_an_empty_orthanc(orthanc_factory: Callable[..., object]) -> None:
    pacs = orthanc_factory(None)
    url = pacs.url  # type: ignore[attr-defined]
    sizes = ["--studies", "1", "--series", "2", "--instances", "2"]
    command = [sys.executable, "-m", "testbed.load", "--url", url, *sizes]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "loaded 4 instances" in done.stdout
    assert len(requests.get(f"{url}/instances", timeout=10).json()) == 4
