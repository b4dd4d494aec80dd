"""The searchers and downloaders packages export every protocol class, and import pynetdicom only when asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

import trolley_tasks.downloaders as downloaders
import trolley_tasks.searchers as searchers


@pytest.mark.parametrize("package", [searchers, downloaders], ids=["searchers", "downloaders"])
def test_every_exported_name_resolves(package: object) -> None:
    for name in package.__all__:  # type: ignore[attr-defined]
        assert getattr(package, name) is not None, name


def test_every_protocol_class_is_exported() -> None:
    assert {"QidoRS", "WadoRSMetadata", "Mint", "DICOMQR", "CachedSearcher"} <= set(searchers.__all__)
    assert {"WadoRS", "WadoURI", "Rad69", "CGet", "CMove"} <= set(downloaders.__all__)


def test_http_only_imports_do_not_load_pynetdicom() -> None:
    code = (
        "import sys, trolley_tasks.searchers, trolley_tasks.downloaders; "
        "assert 'pynetdicom' not in sys.modules, 'pynetdicom loaded'; "
        "from trolley_tasks.downloaders import CGet; assert 'pynetdicom' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
