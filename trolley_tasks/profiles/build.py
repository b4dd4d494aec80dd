"""Build a source profile's searcher and downloader, the way a worker process does: once, then reuse.

A task message names a profile (``"orthanc"``); each worker resolves that name against its own configuration and
builds its clients here. So URLs, AE titles and credentials never travel in messages, and HTTP sessions and DIMSE
associations live as long as the worker process.

Protocol modules are imported only when a profile uses them, so a WADO-RS worker never loads pynetdicom.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import requests
from requests.auth import AuthBase

from trolley_tasks.downloaders.base import AS_STORED, Downloader
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.profiles.models import AuthConfig, SourceProfile
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.transports.auth import BasicAuth, BearerAuth, VitreaAuth, make_session, read_secret
from trolley_tasks.transports.http import EndpointOptions, SessionOrFactory

if TYPE_CHECKING:
    from trolley_tasks.transports.dimse import DimseTLS
    from trolley_tasks.transports.storage_scp import StorageReceiver


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

        return QidoRS(
            http_session,
            _need(profile.url, "url", name),
            **_http_options(profile, name),
        )
    if profile.searcher == "wado-rs-metadata":
        from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

        url = _need(profile.url, "url", name)
        return WadoRSMetadata(
            http_session,
            url,
            **_http_options(profile, name),
        )
    from trolley_tasks.searchers.mint import Mint

    mint_url = _need(profile.mint_url, "mint_url", name)
    return Mint(
        http_session,
        mint_url,
        **_http_options(profile, name),
    )


def _http_options(profile: SourceProfile, name: str) -> EndpointOptions:
    """What every HTTP client of a profile is given: its name for errors and logs, its timeout and its size caps."""
    return {
        "source": name,
        "timeout": profile.timeout,
        "max_answer_bytes": profile.max_answer_bytes,
        "max_instance_bytes": profile.max_instance_bytes,
    }


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
    http_session: SessionOrFactory = session or _own_session(profile)
    if profile.downloader == "wado-rs":
        from trolley_tasks.downloaders.wado_rs import WadoRS

        return WadoRS(
            http_session,
            _need(profile.url, "url", name),
            transfer_syntax=profile.transfer_syntax,
            **_http_options(profile, name),
        )
    if profile.downloader == "wado-uri":
        from trolley_tasks.downloaders.wado_uri import WadoURI

        return WadoURI(
            http_session,
            _need(profile.wado_uri_url, "wado_uri_url", name),
            transfer_syntax=profile.transfer_syntax,
            **_http_options(profile, name),
        )
    from trolley_tasks.downloaders.rad69 import DEFAULT_TRANSFER_SYNTAXES, Rad69

    syntaxes = DEFAULT_TRANSFER_SYNTAXES if profile.transfer_syntax == AS_STORED else (profile.transfer_syntax,)
    return Rad69(
        http_session,
        _need(profile.rad69_url, "rad69_url", name),
        transfer_syntaxes=syntaxes,
        **_http_options(profile, name),
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
            max_instance_bytes=profile.max_instance_bytes,
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
        receiver_allowed_aets=receiver_peers(profile)[0],
        receiver_allowed_hosts=receiver_peers(profile)[1],
        max_instance_bytes=profile.max_instance_bytes,
        max_association_bytes=profile.receiver_max_association_bytes,
    )


def receiver_peers(profile: SourceProfile) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The calling AE titles and peer hosts a profile's C-MOVE receiver accepts: the configured ones, else the
    PACS's own (``called_aet`` and ``host``)."""
    aets = profile.receiver_allowed_aets if profile.receiver_allowed_aets is not None else (profile.called_aet,)
    hosts = profile.receiver_allowed_hosts
    if hosts is None:
        hosts = (profile.host,) if profile.host else ()
    return aets, hosts


def build_receiver(profile: SourceProfile, name: str, spool_dir: Path) -> StorageReceiver:
    """The C-MOVE receiver of ``profile`` on this host, writing to ``spool_dir`` (what the engine runs once per
    host). Its address is ``receiver_host``, else the local address of the route to the PACS (never 0.0.0.0)."""
    from trolley_tasks.transports.storage_scp import StorageReceiver, route_address

    host = profile.receiver_host
    if host is None:
        host = route_address(_need(profile.host, "host", name), int(_need(profile.port, "port", name)))
    aets, hosts = receiver_peers(profile)
    return StorageReceiver(
        _need(profile.move_destination, "move_destination", name),
        host,
        int(_need(profile.receiver_port, "receiver_port", name)),
        spool_dir,
        allowed_aets=aets,
        allowed_hosts=hosts,
        max_instance_bytes=profile.max_instance_bytes,
        max_association_bytes=profile.receiver_max_association_bytes,
    )
