"""Authentication for the HTTP sources: basic, bearer, the Vitrea login flow, client certificates.

Secrets are read from an environment variable or a file whose *name* the configuration gives
(``BasicAuth.from_env("trolley", password_env="PACS_PASSWORD")``), never from a command line or a task message. A
missing one raises :class:`MissingCredentialError` naming the variable or the file, never a value. No ``repr`` or
``str`` here shows a secret, and nothing here logs one.

All auth classes are ``requests.auth.AuthBase``: put one on a session (``session.auth = ...``, or
:func:`make_session`) and every searcher and downloader built on that session uses it, through
:func:`trolley_tasks.transports.http.request`.

DICOM TLS for DIMSE lives with the DIMSE transport: :class:`trolley_tasks.transports.dimse.DimseTLS`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, _basic_auth_str

from trolley_tasks.errors import AuthError, ConfigurationError, MissingCredentialError
from trolley_tasks.transports.http import redact_url, request

logger = logging.getLogger("trolley.auth")

PathLike = str | os.PathLike[str]
DEFAULT_REALM = "DefaultSystemRealm"
"""Vitrea's realm when none is configured (PROTOCOLS.md)."""

_LOGIN_REFUSALS = tuple(status for status in range(400, 500) if status != 429)
"""Login answers that mean "not logged in" (AuthError). 429 and 5xx keep their busy / server-error classes."""


def read_secret(*, env: str | None = None, file: PathLike | None = None, what: str = "secret") -> str:
    """The secret in environment variable ``env`` or in ``file`` (give exactly one).

    A file's trailing newline is dropped (``echo pw > file`` is how people write them). An empty value counts as
    missing: an empty password is a configuration mistake, not a credential.

    Raises
    ------
    MissingCredentialError
        The variable is unset or empty, or the file is absent, unreadable or empty. The message names the variable or
        the file, never a value.
    """
    if (env is None) == (file is None):
        raise ConfigurationError(f"{what}: give the name of an environment variable or a file, exactly one")
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise MissingCredentialError(f"{what}: environment variable {env} is not set")
        return value
    assert file is not None
    try:
        value = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise MissingCredentialError(f"{what}: cannot read file {file} ({type(exc).__name__})") from exc
    if not value:
        raise MissingCredentialError(f"{what}: file {file} is empty")
    return value


class BasicAuth(AuthBase):
    """HTTP basic authentication (RFC 7617), with a password that never shows in a repr."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password

    @classmethod
    def from_env(cls, username: str, *, password_env: str) -> BasicAuth:
        return cls(username, read_secret(env=password_env, what=f"password of {username}"))

    @classmethod
    def from_file(cls, username: str, *, password_file: PathLike) -> BasicAuth:
        return cls(username, read_secret(file=password_file, what=f"password of {username}"))

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = _basic_auth_str(self.username, self._password)
        return r

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__


class BearerAuth(AuthBase):
    """``Authorization: Bearer <token>`` (RFC 6750), with a token that never shows in a repr."""

    def __init__(self, token: str) -> None:
        self._token = token

    @classmethod
    def from_env(cls, token_env: str) -> BearerAuth:
        return cls(read_secret(env=token_env, what="bearer token"))

    @classmethod
    def from_file(cls, token_file: PathLike) -> BearerAuth:
        return cls(read_secret(file=token_file, what="bearer token"))

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "BearerAuth(token=<hidden>)"

    __str__ = __repr__


class VitreaAuth(AuthBase):
    """Vitrea Connection's login flow (PROTOCOLS.md): a session cookie from a login POST, renewed once on a 401.

    The first request logs in with ``POST login_url`` carrying ``X-Userid``, ``X-Password`` and ``X-Realm``
    headers; 200 means logged in and the server sets a session cookie, which every later request carries (the
    server checks the cookie, not the token the login returns). When a request gets a 401 (the session expired),
    this logs in again and replays that request once; a second 401 is an :class:`AuthError`.

    Parameters
    ----------
    login_url
        The login endpoint.
    user, password
        The account (``user`` as dicomtrolley names it). Prefer :meth:`from_env` / :meth:`from_file`.
    realm
        ``X-Realm``; Vitrea's default is ``DefaultSystemRealm``.
    session
        The session to log in through, so that the login uses the same client certificate, CA bundle and
        keep-alive connections as the requests it serves. :func:`make_session` binds it; without one a private
        session is used.

    Raises
    ------
    AuthError
        The login answered anything but 200 (401/403 and any other status), or set no cookie. A busy or failing
        server during login (429/503, 5xx) raises the server-busy / server-error classes instead, so that a
        momentary outage does not pause a job as if the password were wrong.
    """

    def __init__(
        self,
        login_url: str,
        user: str,
        password: str,
        realm: str = DEFAULT_REALM,
        session: requests.Session | None = None,
    ) -> None:
        self.login_url = login_url
        self.user = user
        self.realm = realm
        self._password = password
        self._session = session
        self._jar = requests.cookies.RequestsCookieJar()
        self._generation = 0  # bumped by every successful login
        self._lock = threading.Lock()
        self._local = threading.local()

    @classmethod
    def from_env(cls, login_url: str, user: str, *, password_env: str, realm: str = DEFAULT_REALM) -> VitreaAuth:
        return cls(login_url, user, read_secret(env=password_env, what=f"password of {user}"), realm)

    @classmethod
    def from_file(cls, login_url: str, user: str, *, password_file: PathLike, realm: str = DEFAULT_REALM) -> VitreaAuth:
        return cls(login_url, user, read_secret(file=password_file, what=f"password of {user}"), realm)

    def __repr__(self) -> str:
        return (
            f"VitreaAuth(login_url={redact_url(self.login_url)!r}, user={self.user!r}, "
            f"realm={self.realm!r}, password=<hidden>)"
        )

    __str__ = __repr__

    def bind(self, session: requests.Session) -> None:
        """Log in through ``session`` from now on (it should be the session this auth is set on)."""
        self._session = session

    @property
    def logins(self) -> int:
        """How many successful logins this object made (1 after the first request, +1 per renewal)."""
        return self._generation

    def login(self, stale_generation: int | None = None) -> None:
        """Log in now. With ``stale_generation``, skip it if another thread already renewed since that login."""
        with self._lock:
            if stale_generation is not None and self._generation != stale_generation:
                return
            session = self._session if self._session is not None else requests.Session()
            where = redact_url(self.login_url)
            self._local.in_login = True
            try:
                response = request(
                    session,
                    "POST",
                    self.login_url,
                    source=where,
                    headers={"X-Userid": self.user, "X-Password": self._password, "X-Realm": self.realm},
                    ok_statuses=_LOGIN_REFUSALS,
                    allow_redirects=False,  # never carry X-Userid/X-Password to wherever a 3xx points
                )
            finally:
                self._local.in_login = False
            response.close()
            if response.is_redirect:
                raise AuthError(
                    f"Vitrea login answered HTTP {response.status_code} (a redirect): not followed, the password "
                    "would travel with it; configure the final login_url",
                    source=where,
                )
            if response.status_code != 200:
                raise AuthError(
                    f"Vitrea login as {self.user!r} (realm {self.realm}) failed: HTTP {response.status_code}",
                    source=where,
                )
            if not response.cookies:
                raise AuthError(f"Vitrea login as {self.user!r} answered 200 but set no session cookie", source=where)
            self._jar = requests.cookies.RequestsCookieJar()
            self._jar.update(response.cookies)
            self._generation += 1
            logger.info("logged in to %s as %s (login %d)", where, self.user, self._generation)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if getattr(self._local, "in_login", False):
            return r  # the login request itself, sent through a session that carries this auth
        if self._generation == 0:
            self.login(stale_generation=0)
        self._local.generation = self._generation  # read before the cookies: a race can only cost a spare login
        self._apply_cookies(r)
        r.register_hook("response", self._renew_on_401)
        return r

    def _apply_cookies(self, r: requests.PreparedRequest) -> None:
        jar = requests.cookies.RequestsCookieJar()
        existing = getattr(r, "_cookies", None)
        if existing is not None:
            jar.update(existing)
        jar.update(self._jar)
        r.headers.pop("Cookie", None)
        r.prepare_cookies(jar)

    def _renew_on_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401:
            return response
        used = getattr(self._local, "generation", self._generation)
        _ = response.content  # drain the small 401 body so that the connection can be reused
        response.close()
        self.login(stale_generation=used)
        logger.info("%s answered 401; logged in again, replaying once", redact_url(response.url or ""))
        replay = response.request.copy()
        replay.hooks = {"response": [hook for hook in replay.hooks["response"] if hook != self._renew_on_401]}
        self._apply_cookies(replay)
        new = response.connection.send(replay, **kwargs)
        new.history.append(response)
        new.request = replay
        return new


def configure_tls(
    session: requests.Session,
    *,
    client_cert: PathLike | None = None,
    client_key: PathLike | None = None,
    ca_bundle: PathLike | None = None,
) -> requests.Session:
    """Present a client certificate and/or trust a CA bundle on ``session``; the files must exist.

    ``client_cert`` alone may be a PEM holding both certificate and key. ``ca_bundle`` is a PEM file or a
    c_rehash'ed directory. requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` in the environment override a
    session's ``verify`` (requests issue #3829), which would silently drop the source's CA; so the settings are also
    pinned in an HTTPS adapter mounted on the session, which the environment cannot override.

    Raises
    ------
    ConfigurationError
        A file is missing, or a key is given without a certificate.
    """
    if client_key is not None and client_cert is None:
        raise ConfigurationError("a client key was given without its client certificate")
    for what, path in (("client certificate", client_cert), ("client key", client_key)):
        if path is not None and not Path(path).is_file():
            raise ConfigurationError(f"{what}: no file at {path}")
    if ca_bundle is not None and not Path(ca_bundle).exists():
        raise ConfigurationError(f"CA bundle: nothing at {ca_bundle}")
    if client_cert is None and ca_bundle is None:
        return session
    cert = None
    if client_cert is not None:
        cert = (str(client_cert), str(client_key)) if client_key is not None else str(client_cert)
        session.cert = cert
    if ca_bundle is not None:
        session.verify = str(ca_bundle)
    session.mount("https://", _PinnedTLSAdapter(cert=cert, verify=str(ca_bundle) if ca_bundle is not None else None))
    return session


class _PinnedTLSAdapter(HTTPAdapter):
    """An HTTPS adapter that always uses the source's client certificate and CA bundle (see :func:`configure_tls`)."""

    def __init__(self, *, cert: str | tuple[str, str] | None, verify: str | None) -> None:
        super().__init__()
        self._cert = cert
        self._verify = verify

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if self._cert is not None:
            kwargs["cert"] = self._cert
        if self._verify is not None:
            kwargs["verify"] = self._verify
        return super().send(request, *args, **kwargs)


def create_session(login_url: str, user: str, password: str, realm: str = DEFAULT_REALM) -> requests.Session:
    """A session that logs in to Vitrea when it first needs to, and again on a 401: dicomtrolley's one-liner.

    The same as ``make_session(VitreaAuth(login_url, user, password, realm))``; use :func:`make_session` for a client
    certificate or a CA bundle, and :meth:`VitreaAuth.from_env` to keep the password out of the script.
    """
    return make_session(VitreaAuth(login_url, user, password, realm))


def impax_login(wado_url: str, user: str, password: str, session: requests.Session | None = None) -> requests.Session:
    """Log ``session`` (a new one by default) in to AGFA IMPAX Data Center 3.1.1's WADO, and return it.

    The flow is stateful and odd (PROTOCOLS.md): one ``GET wado_url`` opens a session, then ``GET
    wado_url/j_security_check?j_username=&j_password=`` logs it in. A failure answers 200 with "Login Failed!" in
    the body; a success answers 403. The password travels in the query string because the server wants it there;
    no message or log here shows that URL's query (:func:`~trolley_tasks.transports.http.redact_url`).

    Raises
    ------
    AuthError
        "Login Failed!" in the answer, or any status but 200/403 in the 4xx range.
    RetrievalError
        The server cannot be reached or fails (the error tree's network, busy and server classes).
    """
    session = session if session is not None else requests.Session()
    where = redact_url(wado_url)
    request(session, "GET", wado_url, source=where, ok_statuses=_LOGIN_REFUSALS).close()  # opens the session
    response = request(
        session,
        "GET",
        f"{wado_url.rstrip('/')}/j_security_check",
        source=where,
        params={"j_username": user, "j_password": password},
        ok_statuses=_LOGIN_REFUSALS,
    )
    failed = "Login Failed!" in response.text or response.status_code not in (200, 403)
    response.close()
    if failed:
        raise AuthError(f"IMPAX login as {user!r} failed (HTTP {response.status_code})", source=where)
    logger.info("logged in to IMPAX WADO %s as %s", where, user)
    return session


def make_session(
    auth: AuthBase | None = None,
    *,
    client_cert: PathLike | None = None,
    client_key: PathLike | None = None,
    ca_bundle: PathLike | None = None,
) -> requests.Session:
    """A ``requests.Session`` for one source: its auth, client certificate and CA bundle. Reuse it (keep-alive)."""
    session = configure_tls(requests.Session(), client_cert=client_cert, client_key=client_key, ca_bundle=ca_bundle)
    if auth is not None:
        session.auth = auth
        if isinstance(auth, VitreaAuth):
            auth.bind(session)
    return session
