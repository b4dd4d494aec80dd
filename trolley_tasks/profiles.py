"""Build a source profile's searcher and downloader, the way a worker process does: once, then reuse.

A task message names a profile (``"orthanc"``); each worker resolves that name against its own configuration and
builds its clients here. So URLs, AE titles and credentials never travel in messages, and HTTP sessions and DIMSE
associations live as long as the worker process.

Protocol modules are imported only when a profile uses them, so a WADO-RS worker never loads pynetdicom.

A profile is a ``[sources.NAME]`` table of the configuration (:class:`SourceProfile`): which protocols, where, how
to authenticate (secrets by variable or file *name* only), and how gently. The models validate everything a profile
says when the file is read, so a mistake is one line naming the key, never a failure at 3 a.m. in a worker.
"""

from __future__ import annotations

import functools
import os
import re
from datetime import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from requests.auth import AuthBase

from trolley_tasks.downloaders.base import AS_STORED, Downloader
from trolley_tasks.errors import ConfigurationError, ErrorClass, MissingCredentialError
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.transports.auth import BasicAuth, BearerAuth, VitreaAuth, make_session, read_secret
from trolley_tasks.transports.http import SessionOrFactory

if TYPE_CHECKING:
    from trolley_tasks.transports.dimse import DimseTLS

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
    receiver_host: str = "0.0.0.0"
    receiver_port: int | None = Field(default=None, ge=1, le=65535)
    spool_dir: Path | None = None
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


def auth_from_config(config: AuthConfig) -> AuthBase | None:
    """The auth object a ``[sources.NAME.auth]`` table describes , secrets read."""
    if config.type == "none":
        return None
    if config.type == "bearer":
        if config.token_env:
            return BearerAuth.from_env(config.token_env)
        assert config.token_file is not None
        return BearerAuth.from_file(config.token_file)
    assert config.username is not None
    what = f"password of {config.username}"
    if config.password_env:
        password = read_secret(env=config.password_env, what=what)
    else:
        password = read_secret(file=config.password_file, what=what)
    if config.type == "basic":
        return BasicAuth(config.username, password)
    assert config.login_url is not None
    return VitreaAuth(config.login_url, config.username, password, realm=config.realm)


def session_for_profile(profile: SourceProfile) -> requests.Session:
    """The session a worker builds once for a source profile: auth, client certificate and CA bundle applied."""
    return make_session(
        auth_from_config(profile.auth),
        client_cert=profile.client_cert,
        client_key=profile.client_key,
        ca_bundle=profile.ca_bundle,
    )


def _need(value: str | int | None, key: str, name: str) -> str:
    # config.SourceProfile already refuses a profile whose protocols lack their keys; this keeps mypy honest.
    if value is None:
        raise AssertionError(f"profile {name} has no {key}")
    return str(value)


def _dimse_tls(profile: SourceProfile) -> DimseTLS | None:
    """DICOM TLS for a DIMSE profile that asks for it: our certificate and key, and the PACS's CA bundle."""
    if not profile.dimse_tls:
        return None
    from trolley_tasks.transports.dimse import DimseTLS

    return DimseTLS(ca_file=profile.ca_bundle, cert_file=profile.client_cert, key_file=profile.client_key)


def _own_session(profile: SourceProfile) -> SessionOrFactory:
    """A way to make the profile's session, so that the client built with it owns it (and closes it on close())."""
    return functools.partial(session_for_profile, profile)


def build_searcher(profile: SourceProfile, name: str, session: requests.Session | None = None) -> Searcher:
    """The searcher ``profile.searcher`` names, over ``session`` (built from the profile when not given; then the
    searcher owns it and its ``close()`` closes it)."""
    timeout = profile.timeout
    if profile.searcher == "dicom-qr":
        from trolley_tasks.searchers.dicom_qr import DICOMQR

        return DICOMQR(
            _need(profile.host, "host", name),
            int(_need(profile.port, "port", name)),
            profile.calling_aet,
            profile.called_aet,
            source=name,
            timeout=timeout,
            tls=_dimse_tls(profile),
        )
    http_session: SessionOrFactory = session or _own_session(profile)
    if profile.searcher == "qido-rs":
        from trolley_tasks.searchers.qido_rs import QidoRS

        return QidoRS(http_session, _need(profile.url, "url", name), source=name, timeout=timeout)
    if profile.searcher == "wado-rs-metadata":
        from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

        return WadoRSMetadata(http_session, _need(profile.url, "url", name), source=name, timeout=timeout)
    from trolley_tasks.searchers.mint import Mint

    return Mint(http_session, _need(profile.mint_url, "mint_url", name), source=name, timeout=timeout)


def build_downloader(
    profile: SourceProfile,
    name: str,
    session: requests.Session | None = None,
    *,
    run_receiver: bool = True,
) -> Downloader:
    """The downloader ``profile.downloader`` names, over ``session`` as for :func:`build_searcher`.

    ``profile.transfer_syntax`` is honoured where the protocol can ask for a syntax (WADO-RS, WADO-URI, RAD-69);
    C-GET and C-MOVE take what the PACS negotiates, so a profile that names a syntax for them is refused.

    Parameters
    ----------
    run_receiver
        C-MOVE only: start this downloader's own storage receiver (library use, one process), or rely on the one
        receiver that runs per worker host and writes to ``profile.spool_dir`` (engine use).
    """
    if profile.downloader in ("c-get", "c-move"):
        return _dimse_downloader(profile, name, run_receiver)
    timeout = profile.timeout
    http_session: SessionOrFactory = session or _own_session(profile)
    if profile.downloader == "wado-rs":
        from trolley_tasks.downloaders.wado_rs import WadoRS

        return WadoRS(
            http_session,
            _need(profile.url, "url", name),
            source=name,
            timeout=timeout,
            transfer_syntax=profile.transfer_syntax,
        )
    if profile.downloader == "wado-uri":
        from trolley_tasks.downloaders.wado_uri import WadoURI

        return WadoURI(
            http_session,
            _need(profile.wado_uri_url, "wado_uri_url", name),
            source=name,
            timeout=timeout,
            transfer_syntax=profile.transfer_syntax,
        )
    from trolley_tasks.downloaders.rad69 import DEFAULT_TRANSFER_SYNTAXES, Rad69

    syntaxes = DEFAULT_TRANSFER_SYNTAXES if profile.transfer_syntax == AS_STORED else (profile.transfer_syntax,)
    return Rad69(
        http_session,
        _need(profile.rad69_url, "rad69_url", name),
        source=name,
        timeout=timeout,
        transfer_syntaxes=syntaxes,
    )


def _dimse_downloader(profile: SourceProfile, name: str, run_receiver: bool) -> Downloader:
    """C-GET or C-MOVE for ``profile``; they take what the PACS negotiates, so a named transfer syntax is refused."""
    timeout = profile.timeout
    if profile.transfer_syntax != AS_STORED:
        raise ConfigurationError(
            f"profile {name}: the {profile.downloader} downloader cannot ask for transfer syntax "
            f"{profile.transfer_syntax} (the PACS chooses among the syntaxes we accept); use '*'"
        )
    host, port = _need(profile.host, "host", name), int(_need(profile.port, "port", name))
    if profile.downloader == "c-get":
        from trolley_tasks.downloaders.dicom_qr import CGet

        return CGet(
            host,
            port,
            profile.calling_aet,
            profile.called_aet,
            source=name,
            timeout=timeout,
            tls=_dimse_tls(profile),
        )
    from trolley_tasks.downloaders.dicom_qr import CMove

    return CMove(
        host,
        port,
        profile.calling_aet,
        profile.called_aet,
        destination_aet=_need(profile.move_destination, "move_destination", name),
        receiver_port=int(_need(profile.receiver_port, "receiver_port", name)),
        receiver_host=profile.receiver_host,
        spool_dir=Path(profile.spool_dir) if profile.spool_dir else None,
        run_receiver=run_receiver,
        source=name,
        timeout=timeout,
        tls=_dimse_tls(profile),
    )
