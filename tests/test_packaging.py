"""``pip install trolley-tasks`` brings the library, the engine and the CLI: no numpy, no test bed, no demo (issue 9).

The wheel is built from a copy of the checkout, so that the build leaves no ``build/`` or ``*.egg-info`` behind in
the working tree, with the venv's own setuptools (a dev dependency) and no network: ``--no-build-isolation``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = ("testbed/", "scripts/", "bench/", "tests/", "workers/", "ops/", "docs/")
"""Top-level folders of the checkout that are tools for us, not the package."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"),
    )
    out = work / "out"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out]
    result = subprocess.run([*map(str, command), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("trolley_tasks-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def requirements(archive: zipfile.ZipFile) -> list[str]:
    (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    return Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []


@pytest.mark.slow
def test_wheel_holds_the_package_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert "trolley_tasks/py.typed" in names
    assert "trolley_tasks/formats/part10.py" in names and "trolley_tasks/engine/celery_app/tasks.py" in names
    assert "trolley_tasks/cli/__init__.py" in names
    assert [n for n in names if n.startswith(NOT_SHIPPED)] == []
    assert [n for n in names if "demo" in n.lower()] == []
    assert [n for n in names if n.split("/")[0] != "trolley_tasks" and ".dist-info/" not in n] == []


@pytest.mark.slow
def test_numpy_is_required_only_by_the_dev_extra(wheel: zipfile.ZipFile) -> None:
    numpy = [r for r in requirements(wheel) if r.lower().startswith("numpy")]
    assert numpy, "numpy should still be a dev dependency (the test bed generates pixel data with it)"
    assert all('extra == "dev"' in r for r in numpy), numpy
