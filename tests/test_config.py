"""Configuration: TOML source profiles, environment overrides, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from trolley_tasks.engine.settings import find_config_file, load_settings
from trolley_tasks.errors import ConfigurationError, ErrorClass, MissingCredentialError
from trolley_tasks.profiles import parse_rate, parse_window

GOOD = """
[broker]
url = "redis://127.0.0.1:6379/0"

[sources.orthanc]
searcher = "qido-rs"
downloader = "wado-rs"
url = "http://127.0.0.1:8042/dicom-web/"
max_concurrency = 2
rate_limit = "600/min"
window = "20:00-06:00"

[sources.orthanc.auth]
type = "basic"
username = "trolley"
password_env = "TT_TEST_PASSWORD"

[sources.orthanc.retry.server-error]
max_attempts = 6

[sources.dimse]
searcher = "dicom-qr"
downloader = "c-move"
host = "127.0.0.1"
port = 4242
called_aet = "ORTHANC"
move_destination = "TROLLEY"
receiver_port = 11113
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trolley.toml"
    path.write_text(text)
    return path


def test_good_file_loads_with_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_SOURCES__ORTHANC__MAX_CONCURRENCY", "3")
    monkeypatch.setenv("TT_TEST_PASSWORD", "secret")
    settings = load_settings(write(tmp_path, GOOD))
    profile = settings.source("orthanc")
    assert profile.max_concurrency == 3  # the environment beats the file
    assert profile.url == "http://127.0.0.1:8042/dicom-web"
    assert profile.requests_per_second == 10
    assert profile.retry[ErrorClass.SERVER_ERROR].max_attempts == 6
    assert settings.broker.ledger() == "redis://127.0.0.1:6379/0"
    assert settings.source("dimse").downloader == "c-move"
    assert "secret" not in repr(settings)


def test_config_file_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROLLEY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_config_file() is None
    path = write(tmp_path, GOOD)
    assert find_config_file() == path
    other = tmp_path / "other.toml"
    other.write_text("")
    monkeypatch.setenv("TROLLEY_CONFIG", str(other))
    assert find_config_file() == other
    assert find_config_file(path) == path  # --config wins
    with pytest.raises(ConfigurationError, match="no such configuration file"):
        find_config_file(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('url = "http://127.0.0.1:8042/dicom-web/"', 'urll = "http://x"'), r"\[sources.orthanc\] unknown key 'urll'"),
        (('url = "http://127.0.0.1:8042/dicom-web/"', 'url = "ftp://x"'), r"\[sources.orthanc\] url: .*not an http"),
        (
            ('url = "http://127.0.0.1:8042/dicom-web/"', 'url = "http://u:p@h/x"'),
            r"\[sources.orthanc\] url: put credentials in \[auth\]",
        ),
        (('rate_limit = "600/min"', 'rate_limit = "fast"'), r"\[sources.orthanc\] rate_limit: .*not a rate"),
        (('window = "20:00-06:00"', 'window = "25:00-06:00"'), r"\[sources.orthanc\] window:"),
        (('searcher = "dicom-qr"', 'searcher = "dicom-qr-x"'), r"\[sources.dimse\] searcher:"),
        (("port = 4242\n", ""), r"\[sources\] dimse: .*needs 'port'"),
        (('password_env = "TT_TEST_PASSWORD"', ""), r"needs 'password_env' or 'password_file'"),
        (("[broker]", "[brokr]"), r"unknown section \[brokr\]"),
    ],
)
def test_mistakes_give_one_line_naming_file_section_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigurationError, match=message) as info:
        load_settings(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_toml_and_missing_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings(write(tmp_path, "[sources\n"))
    monkeypatch.delenv("TT_TEST_PASSWORD", raising=False)
    settings = load_settings(write(tmp_path, GOOD))
    with pytest.raises(MissingCredentialError, match=r"\[sources.orthanc.auth\] password_env: .*TT_TEST_PASSWORD"):
        settings.source("orthanc")
    with pytest.raises(ConfigurationError, match=r"no \[sources.nope\] \(known sources: dimse, orthanc\)"):
        settings.source("nope")


def test_rate_and_window_parsing() -> None:
    assert parse_rate("50/s") == 50 and parse_rate("3600/h") == 1
    start, end = parse_window("20:00-06:00")
    assert (start.hour, end.hour) == (20, 6)
    for bad in ("0/s", "x"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError, match="empty"):
        parse_window("06:00-06:00")
