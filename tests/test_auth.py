"""Authentication: basic against a real Orthanc with users, bearer and the Vitrea login flow against local fakes,
client certificates against a local mutual-TLS server. Secrets never reach a log line, a repr or an error."""

from __future__ import annotations

import base64
import logging
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from testbed.cohort import generate_cohort
from trolley_tasks.downloaders.base import payload_bytes
from trolley_tasks.downloaders.wado_uri import WadoURI
from trolley_tasks.errors import AuthError, ConfigurationError, MissingCredentialError, TrolleyError
from trolley_tasks.profiles import AuthConfig, SourceProfile, auth_from_config, session_for_profile
from trolley_tasks.transports import http
from trolley_tasks.transports.auth import (
    BasicAuth,
    BearerAuth,
    VitreaAuth,
    configure_tls,
    make_session,
    read_secret,
)

PASSWORD = "s3cret-pass"
TOKEN = "tok-9f8e7d6c5b4a"
AUTH_COHORT = generate_cohort(studies=1, series=1, instances=2, seed=23, rows=32, columns=32)


def secret_forms(secret: str, user: str = "trolley") -> list[str]:
    """The secret as it could leak: plain, and inside a basic-auth header."""
    return [secret, base64.b64encode(f"{user}:{secret}".encode()).decode()]


def assert_not_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    assert caplog.records, "expected some log records at DEBUG (urllib3 logs every request)"
    for record in caplog.records:
        line = record.getMessage() + repr(record.args)
        for form in secret_forms(secret):
            assert form not in line, f"secret leaked in log line from {record.name}"


# --------------------------------------------------------------------------------------------------- secrets


def test_read_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_TEST_PW", PASSWORD)
    assert read_secret(env="TROLLEY_TEST_PW") == PASSWORD
    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD + "\n")
    assert read_secret(file=secret_file) == PASSWORD


def test_missing_secret_names_the_variable_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROLLEY_NO_SUCH_VAR", raising=False)
    with pytest.raises(MissingCredentialError, match="TROLLEY_NO_SUCH_VAR"):
        BasicAuth.from_env("trolley", password_env="TROLLEY_NO_SUCH_VAR")
    with pytest.raises(MissingCredentialError, match="nope.txt"):
        BearerAuth.from_file(tmp_path / "nope.txt")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MissingCredentialError, match="empty"):
        VitreaAuth.from_file("http://127.0.0.1:1/login", "u", password_file=tmp_path / "empty")
    with pytest.raises(ConfigurationError, match="exactly one"):
        read_secret(env="A", file=tmp_path / "pw")


def test_reprs_never_show_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_TEST_PW", PASSWORD)
    monkeypatch.setenv("TROLLEY_TEST_TOKEN", TOKEN)
    objects: list[Any] = [
        BasicAuth.from_env("trolley", password_env="TROLLEY_TEST_PW"),
        BearerAuth.from_env("TROLLEY_TEST_TOKEN"),
        VitreaAuth.from_env("http://127.0.0.1:1/login", "trolley", password_env="TROLLEY_TEST_PW"),
    ]
    for obj in objects:
        for text in (repr(obj), str(obj), f"{obj}"):
            assert PASSWORD not in text and TOKEN not in text
            assert "<hidden>" in text


# ----------------------------------------------------------------------------------- basic, real Orthanc


@pytest.fixture(scope="module")
def secured_orthanc(orthanc_factory: Callable[..., Any]) -> Any:
    return orthanc_factory(AUTH_COHORT, users={"trolley": PASSWORD})


def test_basic_auth_against_orthanc(
    secured_orthanc: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    item = next(iter(AUTH_COHORT))

    monkeypatch.setenv("TROLLEY_TEST_PW", PASSWORD)
    good = WadoURI(
        make_session(BasicAuth.from_env("trolley", password_env="TROLLEY_TEST_PW")), secured_orthanc.wado_url
    )
    assert [payload_bytes(payload) for _, payload in good.iter_raw(item.reference())] == [AUTH_COHORT.encode(item)]

    monkeypatch.setenv("TROLLEY_TEST_PW", "wrong-" + PASSWORD)
    bad = WadoURI(make_session(BasicAuth.from_env("trolley", password_env="TROLLEY_TEST_PW")), secured_orthanc.wado_url)
    with pytest.raises(AuthError) as raised:
        list(bad.iter_raw(item.reference()))
    for form in secret_forms(PASSWORD) + secret_forms("wrong-" + PASSWORD):
        assert form not in str(raised.value) and form not in repr(raised.value)

    anonymous = requests.Session()
    with pytest.raises(AuthError):
        http.request(anonymous, "GET", f"{secured_orthanc.dicomweb_url}/studies")

    assert any(record.name.startswith("urllib3") for record in caplog.records)
    assert_not_logged(caplog, PASSWORD)
    assert_not_logged(caplog, "wrong-" + PASSWORD)


# --------------------------------------------------------------------------------------------- fake servers


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 whose handler is a plain function of the request."""

    def __init__(
        self,
        handle: Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, headers, body = handle(self)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def start(handle: Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]) -> FakeServer:
        servers.append(FakeServer(handle))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_bearer_token_is_sent(fake_server: Callable[..., FakeServer]) -> None:
    def handle(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        ok = req.headers.get("Authorization") == f"Bearer {TOKEN}"
        return (200, {}, b"ok") if ok else (401, {}, b"no")

    server = fake_server(handle)
    assert http.request(make_session(BearerAuth(TOKEN)), "GET", f"{server.url}/x").content == b"ok"
    with pytest.raises(AuthError):
        http.request(make_session(BearerAuth("other")), "GET", f"{server.url}/x")


class FakeVitrea:
    """Vitrea's login as PROTOCOLS.md describes it: header credentials, a session cookie, 401 once it expires."""

    def __init__(self, accept_login: bool = True, set_cookie: bool = True, always_401: bool = False) -> None:
        self.accept_login, self.set_cookie, self.always_401 = accept_login, set_cookie, always_401
        self.sessions: set[str] = set()
        self.logins: list[dict[str, str]] = []
        self.data_requests = 0
        self.lock = threading.Lock()

    def expire_all(self) -> None:
        self.sessions.clear()

    def __call__(self, req: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            if req.command == "POST" and req.path == "/vitrea/login":
                self.logins.append({k: req.headers.get(k, "") for k in ("X-Userid", "X-Password", "X-Realm")})
                if not (self.accept_login and req.headers.get("X-Password") == PASSWORD):
                    return 401, {}, b"bad login"
                token = f"s{len(self.logins)}"
                self.sessions.add(token)
                headers = {"Set-Cookie": f"JSESSIONID={token}; Path=/"} if self.set_cookie else {}
                return 200, headers, b'{"token": "not-what-the-server-checks"}'
            self.data_requests += 1
            cookie = req.headers.get("Cookie", "")
            valid = any(f"JSESSIONID={token}" in cookie for token in self.sessions)
            if valid and not self.always_401:
                return 200, {}, b"study data"
            return 401, {}, b"session expired"


def test_vitrea_logs_in_keeps_the_cookie_and_renews_once_on_401(
    fake_server: Callable[..., FakeServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeVitrea()
    server = fake_server(fake)
    auth = VitreaAuth(f"{server.url}/vitrea/login", "trolley", PASSWORD)
    session = make_session(auth)

    for _ in range(3):
        assert http.request(session, "GET", f"{server.url}/wado?x=1").content == b"study data"
    assert auth.logins == 1 and len(fake.logins) == 1
    assert fake.logins[0] == {"X-Userid": "trolley", "X-Password": PASSWORD, "X-Realm": "DefaultSystemRealm"}

    fake.expire_all()
    response = http.request(session, "GET", f"{server.url}/wado?x=2")
    assert response.content == b"study data" and [r.status_code for r in response.history] == [401]
    assert auth.logins == 2 and len(fake.logins) == 2
    assert_not_logged(caplog, PASSWORD)


def test_vitrea_login_refused_is_an_auth_error(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server(FakeVitrea(accept_login=False))
    session = make_session(VitreaAuth(f"{server.url}/vitrea/login", "trolley", PASSWORD, realm="Other"))
    with pytest.raises(AuthError, match="login as 'trolley' \\(realm Other\\) failed: HTTP 401") as raised:
        http.request(session, "GET", f"{server.url}/wado")
    assert PASSWORD not in str(raised.value)


def test_vitrea_login_without_cookie_is_an_auth_error(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server(FakeVitrea(set_cookie=False))
    session = make_session(VitreaAuth(f"{server.url}/vitrea/login", "trolley", PASSWORD))
    with pytest.raises(AuthError, match="no session cookie"):
        http.request(session, "GET", f"{server.url}/wado")


def test_vitrea_renews_only_once(fake_server: Callable[..., FakeServer]) -> None:
    fake = FakeVitrea(always_401=True)
    server = fake_server(fake)
    auth = VitreaAuth(f"{server.url}/vitrea/login", "trolley", PASSWORD)
    with pytest.raises(AuthError):
        http.request(make_session(auth), "GET", f"{server.url}/wado")
    assert len(fake.logins) == 2 and fake.data_requests == 2  # first try, one replay, then the error


# ------------------------------------------------------------------------------------------ client certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=trolley test CA", cwd=d)  # fmt: skip
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def test_client_certificate_and_ca_bundle_against_mutual_tls(pki: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(pki / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    server = FakeServer(lambda req: (200, {}, b"hello " + req.headers.get("Host", "").encode()), tls=context)
    url = server.url
    try:
        session = make_session(client_cert=pki / "client.pem", client_key=pki / "client.key", ca_bundle=pki / "ca.pem")
        assert session.cert == (str(pki / "client.pem"), str(pki / "client.key"))
        assert session.verify == str(pki / "ca.pem")
        assert http.request(session, "GET", f"{url}/x").content.startswith(b"hello")
        with pytest.raises(TrolleyError):  # no client certificate: the server ends the handshake
            http.request(make_session(ca_bundle=pki / "ca.pem"), "GET", f"{url}/x")
    finally:
        server.close()


def test_client_certificate_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="client certificate: no file at"):
        make_session(client_cert=tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match="CA bundle"):
        configure_tls(requests.Session(), ca_bundle=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigurationError, match="without its client certificate"):
        make_session(client_key=tmp_path / "k.pem")


# ------------------------------------------------------------------------------------------------- from config


def test_auth_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_TEST_PW", PASSWORD)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    assert auth_from_config(AuthConfig()) is None
    basic = auth_from_config(AuthConfig(type="basic", username="u", password_env="TROLLEY_TEST_PW"))
    assert isinstance(basic, BasicAuth) and basic.username == "u"
    assert isinstance(auth_from_config(AuthConfig(type="bearer", token_file=token_file)), BearerAuth)
    vitrea = auth_from_config(
        AuthConfig(type="vitrea", username="u", password_env="TROLLEY_TEST_PW", login_url="http://127.0.0.1:9/l")
    )
    assert isinstance(vitrea, VitreaAuth) and vitrea.realm == "DefaultSystemRealm"
    monkeypatch.delenv("TROLLEY_TEST_PW")
    with pytest.raises(MissingCredentialError, match="TROLLEY_TEST_PW"):
        auth_from_config(AuthConfig(type="basic", username="u", password_env="TROLLEY_TEST_PW"))


def test_session_for_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_TEST_PW", PASSWORD)
    profile = SourceProfile(
        url="http://127.0.0.1:9/dicom-web",
        auth=AuthConfig(type="vitrea", username="u", password_env="TROLLEY_TEST_PW", login_url="http://127.0.0.1:9/l"),
    )
    session = session_for_profile(profile)
    assert isinstance(session.auth, VitreaAuth)


def test_vitrea_threads_hitting_401_together_log_in_once(fake_server: Callable[..., FakeServer]) -> None:
    fake = FakeVitrea()
    server = fake_server(fake)
    auth = VitreaAuth(f"{server.url}/vitrea/login", "trolley", PASSWORD)
    session = make_session(auth)
    assert http.request(session, "GET", f"{server.url}/wado").content == b"study data"
    fake.expire_all()
    barrier = threading.Barrier(4)
    answers: list[bytes] = []

    def fetch() -> None:
        barrier.wait()
        answers.append(http.request(session, "GET", f"{server.url}/wado").content)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [b"study data"] * 4
    assert auth.logins == 2 and len(fake.logins) == 2
