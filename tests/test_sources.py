"""Every searcher and downloader name a profile may hold builds the right client, without touching the network."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from trolley_tasks.downloaders.base import Downloader
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.profiles import SourceProfile, build_downloader, build_searcher
from trolley_tasks.searchers.base import Searcher

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


def test_dimse_tls_is_built_from_the_profile_certificates(tmp_path: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True,
        capture_output=True,
    )
    shutil.copy(tmp_path / "cert.pem", tmp_path / "ca.pem")
    profile = SourceProfile(
        searcher="dicom-qr",
        downloader="c-get",
        dimse_tls=True,
        ca_bundle=tmp_path / "ca.pem",
        client_cert=tmp_path / "cert.pem",
        client_key=tmp_path / "key.pem",
        **COMMON,  # type: ignore[arg-type]
    )
    searcher = build_searcher(profile, "pacs")
    tls = searcher.associations.tls  # type: ignore[attr-defined]
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (profile.ca_bundle, profile.client_cert, profile.client_key)
    assert build_searcher(SourceProfile(searcher="dicom-qr", **COMMON), "p").associations.tls is None  # type: ignore[arg-type,attr-defined]


def test_unreadable_dimse_certificates_are_a_configuration_error(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("not a certificate")
    profile = SourceProfile(
        searcher="dicom-qr",
        dimse_tls=True,
        client_cert=tmp_path / "cert.pem",
        client_key=tmp_path / "key.pem",
        **COMMON,
    )  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="DICOM TLS"):
        build_searcher(profile, "pacs")


@pytest.mark.parametrize("name", ["c-get", "c-move"])
def test_a_transfer_syntax_dimse_cannot_ask_for_is_refused(name: str) -> None:
    profile = SourceProfile(downloader=name, transfer_syntax="1.2.840.10008.1.2.1", **COMMON)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=name):
        build_downloader(profile, "pacs")


def test_transfer_syntax_reaches_the_http_downloaders() -> None:
    syntax = "1.2.840.10008.1.2.1"
    for name in ("wado-rs", "wado-uri"):
        made = build_downloader(SourceProfile(downloader=name, transfer_syntax=syntax, **COMMON), "pacs")  # type: ignore[arg-type]
        assert made.transfer_syntax == syntax  # type: ignore[attr-defined]
    rad69 = build_downloader(SourceProfile(downloader="rad69", transfer_syntax=syntax, **COMMON), "pacs")  # type: ignore[arg-type]
    assert rad69.transfer_syntaxes == (syntax,)  # type: ignore[attr-defined]


def test_a_session_built_from_the_profile_is_the_clients_own() -> None:
    session = requests.Session()
    lent = build_downloader(SourceProfile(downloader="wado-uri", **COMMON), "pacs", session)  # type: ignore[arg-type]
    own = build_downloader(SourceProfile(downloader="wado-uri", **COMMON), "pacs")  # type: ignore[arg-type]
    assert lent.session is session and not lent.owns_session  # type: ignore[attr-defined]
    assert own.owns_session and own.session is not session  # type: ignore[attr-defined]
