"""Credentials never travel in clear to another host, and the Vitrea login never follows a redirect."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from trolley_tasks.errors import AuthError
from trolley_tasks.profiles import SourceProfile
from trolley_tasks.transports.auth import VitreaAuth, make_session
from trolley_tasks.transports.http import request

BASIC = {"type": "basic", "username": "u", "password_env": "PACS_PW"}
BEARER = {"type": "bearer", "token_env": "PACS_TOKEN"}
VITREA = {"type": "vitrea", "username": "u", "password_env": "PACS_PW"}


@pytest.mark.parametrize("auth", [BASIC, BEARER, {**VITREA, "login_url": "https://pacs.example/login"}])
def test_secrets_over_http_to_another_host_are_refused(auth: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="plain http:// to another host"):
        SourceProfile(url="http://pacs.example:8042/dicom-web", auth=auth)


def test_a_vitrea_login_url_over_http_is_refused() -> None:
    with pytest.raises(ValidationError, match="http://10.1.2.3/login"):
        SourceProfile(url="https://pacs.example/dicom-web", auth={**VITREA, "login_url": "http://10.1.2.3/login"})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8042/dicom-web", "http://localhost/dicom-web", "http://127.0.0.5/x"])
def test_loopback_http_and_https_are_accepted(url: str) -> None:
    assert SourceProfile(url=url, auth=BASIC).url == url.rstrip("/")
    assert SourceProfile(url="https://pacs.example/dicom-web", auth=BASIC).auth.type == "basic"


def test_http_without_secrets_is_accepted() -> None:
    assert SourceProfile(url="http://pacs.example/dicom-web").url == "http://pacs.example/dicom-web"


def test_allow_insecure_http_accepts_with_a_loud_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    url = "http://insecure-once.example/dicom-web"
    with caplog.at_level(logging.WARNING, logger="trolley.security"):
        SourceProfile(url=url, auth=BASIC, allow_insecure_http=True)
        SourceProfile(url=url, auth=BASIC, allow_insecure_http=True)
    warnings = [r for r in caplog.records if "clear text" in r.getMessage()]
    assert len(warnings) == 1
    assert url in warnings[0].getMessage() and warnings[0].levelno == logging.WARNING


def test_vitrea_login_does_not_follow_a_redirect() -> None:
    """A login answered with a 302 to another place: the password must not go there (nor anywhere after)."""
    seen: list[FakeRequest] = []

    def elsewhere(req: FakeRequest) -> Reply:
        seen.append(req)
        return Reply(200, b"stolen", {"Set-Cookie": "session=evil"})

    with FakeHTTPServer(elsewhere) as thief:

        def login(req: FakeRequest) -> Reply:
            return Reply(302, b"", {"Location": f"{thief.url}/collect"})

        with FakeHTTPServer(login) as server:
            auth = VitreaAuth(f"{server.url}/vitrea/login", "trolley", "s3cret-password")
            with pytest.raises(AuthError, match="redirect"):
                request(make_session(auth), "GET", f"{server.url}/wado")
            assert [r.path for r in server.requests] == ["/vitrea/login"]
    assert seen == []
