"""The error tree: every class's policy category, context, and the HTTP status mapping."""

from __future__ import annotations

import pytest
import requests

from trolley_tasks import errors
from trolley_tasks.errors import ErrorClass
from trolley_tasks.transports.http import error_for_status, parse_retry_after, redact_url

EXPECTED = {
    errors.ConfigurationError: ErrorClass.CONFIGURATION,
    errors.MissingCredentialError: ErrorClass.CONFIGURATION,
    errors.UsageError: ErrorClass.REQUEST_REJECTED,
    errors.InvalidUIDError: ErrorClass.REQUEST_REJECTED,
    errors.UnSupportedParameterError: ErrorClass.REQUEST_REJECTED,
    errors.NoReferencesFoundError: ErrorClass.REQUEST_REJECTED,
    errors.NonSeriesParameterError: ErrorClass.REQUEST_REJECTED,
    errors.NonInstanceParameterError: ErrorClass.REQUEST_REJECTED,
    errors.AmbiguousResultError: ErrorClass.REQUEST_REJECTED,
    errors.UnsafePathError: ErrorClass.REQUEST_REJECTED,
    errors.TransientNetworkError: ErrorClass.TRANSIENT,
    errors.PacsTimeoutError: ErrorClass.TIMEOUT,
    errors.ServerBusyError: ErrorClass.SERVER_BUSY,
    errors.ServerError: ErrorClass.SERVER_ERROR,
    errors.PayloadInvalidError: ErrorClass.PAYLOAD_INVALID,
    errors.NotFoundError: ErrorClass.NOT_FOUND,
    errors.StudyNotFoundError: ErrorClass.NOT_FOUND,
    errors.AuthError: ErrorClass.AUTH,
    errors.RequestRejectedError: ErrorClass.REQUEST_REJECTED,
}


@pytest.mark.parametrize(("cls", "expected"), list(EXPECTED.items()), ids=lambda v: getattr(v, "__name__", v))
def test_each_class_has_its_policy_category(cls: type[errors.TrolleyError], expected: ErrorClass) -> None:
    assert issubclass(cls, errors.TrolleyError)
    assert cls.error_class is expected
    assert errors.error_class_of(cls("x")) is expected


def test_every_error_class_in_the_module_is_covered() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.TrolleyError) and obj not in (errors.TrolleyError,)
    }
    assert defined - {errors.RetrievalError} == set(EXPECTED)


def test_errors_carry_context() -> None:
    exc = errors.ServerBusyError("busy", source="pacs1", reference="study 1.2", retry_after=30)
    assert (exc.source, exc.reference, exc.retry_after) == ("pacs1", "study 1.2", 30)
    assert str(exc) == "busy | source=pacs1 | ref=study 1.2 | retry_after=30s"
    assert errors.DICOMTrolleyError is errors.TrolleyError
    assert errors.error_class_of(RuntimeError("bug")) is None


def fake_response(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.reason = "X"
    response.url = "http://user:secret@127.0.0.1:8042/dicom-web/studies?PatientID=1"
    response.headers.update(headers or {})
    return response


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.RequestRejectedError),
        (401, errors.AuthError),
        (403, errors.AuthError),
        (404, errors.NotFoundError),
        (406, errors.RequestRejectedError),
        (410, errors.NotFoundError),
        (415, errors.RequestRejectedError),
        (429, errors.ServerBusyError),
        (500, errors.ServerError),
        (502, errors.ServerError),
        (503, errors.ServerBusyError),
        (504, errors.ServerError),
    ],
)
def test_http_status_mapping(status: int, cls: type[errors.RetrievalError]) -> None:
    error = error_for_status(fake_response(status), source="s")
    assert type(error) is cls
    assert "secret" not in str(error) and "PatientID" not in str(error)


def test_http_success_is_no_error_and_retry_after_is_read() -> None:
    assert error_for_status(fake_response(204)) is None
    error = error_for_status(fake_response(503, {"Retry-After": "7"}))
    assert error is not None and error.retry_after == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert redact_url("https://u:p@host:1/a/b?x=1") == "https://host:1/a/b"
