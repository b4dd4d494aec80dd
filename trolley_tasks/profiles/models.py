"""The ``[sources.NAME]`` tables of the configuration as validated models: which protocols, where, how to
authenticate (secrets by variable or file *name* only), how gently, and within which limits.

The models validate everything a profile says when the file is read, so a mistake is one line naming the key, never
a failure at 3 a.m. in a worker. That includes safety: a secret sent over plain ``http://`` to another host is
refused unless the profile says ``allow_insecure_http = true`` (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from datetime import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trolley_tasks.errors import ErrorClass, MissingCredentialError

SearcherName = Literal["qido-rs", "dicom-qr", "mint", "wado-rs-metadata"]
DownloaderName = Literal["wado-rs", "wado-uri", "c-get", "c-move", "rad69"]

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
logger = logging.getLogger("trolley.security")
_warned: set[str] = set()
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


def _insecure(url: str) -> bool:
    """True for an ``http://`` URL whose host is not this machine's loopback (RFC 6890: 127/8, ::1, localhost)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


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

    action: Literal["retry", "fail", "pause"] | None = None
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
    receiver_host: str | None = None
    """Where the C-MOVE receiver listens. None: the local address of the route to ``host`` (127.0.0.1 when the PACS
    runs on this host), never every interface; set the worker host's own address on the PACS's network otherwise."""
    receiver_port: int | None = Field(default=None, ge=1, le=65535)
    receiver_allowed_aets: tuple[str, ...] | None = None
    """Calling AE titles the receiver accepts; None: the PACS's own, ``called_aet``."""
    receiver_allowed_hosts: tuple[str, ...] | None = None
    """Peer addresses or host names the receiver accepts; None: the PACS's own, ``host``."""
    receiver_max_association_bytes: int = Field(default=64 * 1024**3, ge=1)
    spool_dir: Path | None = None
    max_instance_bytes: int = Field(default=4 * 1024**3, ge=1)
    """The largest instance accepted, by every downloader and the receiver (default 4 GiB)."""
    max_answer_bytes: int = Field(default=64 * 1024**2, ge=1)
    """The largest search or metadata answer read into memory: QIDO-RS, WADO-RS metadata, MINT, RAD-69 SOAP."""
    allow_insecure_http: bool = False
    """Send credentials over plain http:// to another host anyway (a loud warning). Default: refused."""
    max_concurrency: int = Field(default=4, ge=1, le=256)
    breaker_threshold: int = Field(default=5, ge=1, le=1000)
    """Consecutive transient/timeout/busy errors after which the engine holds the whole source (its breaker)."""
    breaker_max_hold: float = Field(default=120.0, gt=0, le=3600)
    """The longest wait, in seconds, between two probes of a held source."""
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

    @field_validator("receiver_allowed_aets")
    @classmethod
    def _check_aets(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for title in value or ():
            if not _AET_RE.match(title):
                raise ValueError(f"{title!r} is not an AE title (1-16 printable characters, no backslash)")
        return value

    @model_validator(mode="after")
    def _secrets_over_tls(self) -> SourceProfile:
        """Credentials (basic, bearer, Vitrea) sent to another host over plain http:// are readable by anyone on
        the path: refused unless ``allow_insecure_http``, and then said loudly once per URL."""
        if self.auth.type == "none":
            return self
        urls = (self.url, self.wado_uri_url, self.mint_url, self.rad69_url, self.auth.login_url)
        for url in (u for u in urls if u and _insecure(u)):
            if not self.allow_insecure_http:
                raise ValueError(
                    f"{url} is plain http:// to another host, and the profile sends {self.auth.type} credentials: "
                    "use https://, or set allow_insecure_http = true if this network is trusted"
                )
            if url not in _warned:
                _warned.add(url)
                logger.warning(
                    "SECURITY: %s credentials travel in clear text to %s (allow_insecure_http)", self.auth.type, url
                )
        return self

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
