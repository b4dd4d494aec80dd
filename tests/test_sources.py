"""Every searcher and downloader name a profile may hold builds the right client, without touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from trolley_tasks.config import SourceProfile
from trolley_tasks.downloaders.base import Downloader
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.sources import build_downloader, build_searcher

COMMON = {
    "url": "http://127.0.0.1:8042/dicom-web",
    "wado_uri_url": "http://127.0.0.1:8042/wado",
    "mint_url": "http://127.0.0.1:8042/mint",
    "rad69_url": "http://127.0.0.1:8042/rad69",
    "host": "127.0.0.1",
    "port": 4242,
    "called_aet": "ORTHANC",
    "move_destination": "TROLLEY",
    "receiver_port": 11113,
    "receiver_host": "127.0.0.1",
}


@pytest.mark.parametrize(
    ("name", "cls"),
    [("qido-rs", "QidoRS"), ("dicom-qr", "DICOMQR"), ("mint", "Mint"), ("wado-rs-metadata", "WadoRSMetadata")],
)
def test_build_searcher(name: str, cls: str) -> None:
    searcher = build_searcher(SourceProfile(searcher=name, **COMMON), "pacs")  # type: ignore[arg-type]
    assert type(searcher).__name__ == cls
    assert isinstance(searcher, Searcher)
    assert searcher.source == "pacs"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("wado-rs", "WadoRS"), ("wado-uri", "WadoURI"), ("c-get", "CGet"), ("c-move", "CMove"), ("rad69", "Rad69")],
)
def test_build_downloader(name: str, cls: str, tmp_path: Path) -> None:
    profile = SourceProfile(downloader=name, spool_dir=tmp_path, **COMMON)  # type: ignore[arg-type]
    downloader = build_downloader(profile, "pacs", run_receiver=False)
    try:
        assert type(downloader).__name__ == cls
        assert isinstance(downloader, Downloader)
        assert downloader.source == "pacs"  # type: ignore[attr-defined]
    finally:
        downloader.close()


def test_http_clients_share_the_session_given() -> None:
    import requests

    session = requests.Session()
    profile = SourceProfile(**COMMON)  # type: ignore[arg-type]
    assert build_searcher(profile, "pacs", session).session is session  # type: ignore[attr-defined]
    assert build_downloader(profile, "pacs", session).session is session  # type: ignore[attr-defined]
