"""The HTTP transport: the one place where requests/urllib3/socket errors and HTTP statuses become trolley errors.

Every HTTP searcher and downloader (QIDO-RS, WADO-RS, WADO-URI, MINT, RAD-69, metadata) calls :func:`request` and
reads bodies through :func:`iter_body` or :func:`read_body`, so that:

- every call has a connect and a read timeout (requests has none by default, and a stalled PACS would hang a worker);
- every call sends ``Accept-Encoding: identity``: DICOM does not compress, and a gzipping server (stock Orthanc)
  costs an order of magnitude in throughput (ORTHANC.md);
- a status or an exception maps to exactly one class of the error tree (:mod:`trolley_tasks.errors`);
- no URL credentials reach an error message;
- a small idempotent answer (a QIDO-RS page, WADO-RS metadata, a MINT answer) is asked again on its own when it
  fails in a way that another try may cure (:func:`retrying`): one flaky request must not cost a whole expansion.

Callers pass any ``requests.Session`` (the seeds' examples make a plain one); it is reused for keep-alive, and
closed only by a client that made it (:class:`HTTPEndpoint`).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions
from pydicom import Dataset
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from trolley_tasks.errors import (
    AuthError,
    ConfigurationError,
    ErrorClass,
    NotFoundError,
    PacsTimeoutError,
    PayloadInvalidError,
    RequestRejectedError,
    RetrievalError,
    ServerBusyError,
    ServerError,
    TransientNetworkError,
)
from trolley_tasks.formats.dicom_json import datasets_from_json

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 60.0)
"""(connect, read) seconds. A read timeout is the longest silence between two bytes, not the whole transfer."""

CHUNK_SIZE = 256 * 1024

DEFAULT_MAX_ANSWER_BYTES = 64 * 1024**2
"""The largest search or metadata answer (QIDO-RS, WADO-RS metadata, MINT, RAD-69 SOAP) read into memory."""
DEFAULT_MAX_INSTANCE_BYTES = 4 * 1024**3
"""The largest instance accepted (streamed to disk, never held in memory)."""

REQUEST_TRIES = 5
"""Tries of one small idempotent request (:func:`retrying`) before its error goes to the caller."""
REQUEST_MAX_WAIT = 30.0
"""The longest wait between two of those tries, a server's Retry-After included (longer: the caller's policy)."""
_RETRIED = frozenset(
    {
        ErrorClass.TRANSIENT,
        ErrorClass.TIMEOUT,
        ErrorClass.SERVER_BUSY,
        ErrorClass.SERVER_ERROR,
        ErrorClass.PAYLOAD_INVALID,
    }
)
T = TypeVar("T")


def _worth_another_try(error: BaseException) -> bool:
    return isinstance(error, RetrievalError) and error.error_class in _RETRIED


def _wait(state: RetryCallState) -> float:
    """Half a second, doubling, with jitter; at least what a Retry-After asked for (capped)."""
    error = state.outcome.exception() if state.outcome else None
    wait = random.uniform(0.5, 1.0) * 2 ** (state.attempt_number - 1)
    asked = getattr(error, "retry_after", None)
    if asked:
        wait = max(wait, asked)
    return min(wait, REQUEST_MAX_WAIT)


def retrying(call: Callable[[], T], *, tries: int = REQUEST_TRIES) -> T:
    """``call()`` (one idempotent request AND the reading of its answer), tried up to ``tries`` times.

    Retried: network errors, timeouts, busy and failing servers, and an answer that arrived broken (a cut JSON or
    XML body is payload-invalid). Not retried: 4xx answers (not found, auth, rejected), which another try cannot
    change. The last error is raised as it was, for the caller's policy to judge. Downloads of instances are not
    retried here: their bytes are already on their way to disk, and the engine's fetch decides.
    """
    for attempt in Retrying(
        stop=stop_after_attempt(tries), wait=_wait, retry=retry_if_exception(_worth_another_try), reraise=True
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable: tenacity re-raises the last error")


def redact_url(url: str) -> str:
    """``url`` without user:password and without its query string, safe for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` header (delta-seconds or an HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(
    response: requests.Response, *, source: str | None = None, reference: Any = None
) -> RetrievalError | None:
    """The error a non-success HTTP status means, or None for 1xx-3xx. Most specific first (RFC 9110, 15)."""
    status = response.status_code
    if status < 400:
        return None
    detail = f"HTTP {status} {response.reason or ''}".strip() + f" from {redact_url(response.url or '')}"
    kwargs: dict[str, Any] = {"source": source, "reference": reference}
    if status in (401, 403):
        return AuthError(f"{detail}: the server refused our credentials", **kwargs)
    if status in (404, 410):
        return NotFoundError(f"{detail}: not on the server", **kwargs)
    if status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return ServerBusyError(f"{detail}: the server is busy", retry_after=retry_after, **kwargs)
    if status >= 500:
        return ServerError(f"{detail}: the server failed", **kwargs)
    if status == 406:
        return RequestRejectedError(
            f"{detail}: the server cannot produce what we accept (media type or transfer syntax)", **kwargs
        )
    return RequestRejectedError(f"{detail}: the server rejected the request", **kwargs)


def raise_for_status(response: requests.Response, *, source: str | None = None, reference: Any = None) -> None:
    """Raise the mapped error for a failed response, after releasing its connection."""
    error = error_for_status(response, source=source, reference=reference)
    if error is not None:
        response.close()
        raise error


@contextmanager
def mapped_errors(*, source: str | None = None, reference: Any = None, url: str = "") -> Iterator[None]:
    """Translate requests, urllib3 and socket exceptions raised inside the block into the error tree."""
    where = f" ({redact_url(url)})" if url else ""
    kwargs: dict[str, Any] = {"source": source, "reference": reference}
    try:
        yield
    except (TimeoutError, requests.exceptions.Timeout, urllib3.exceptions.TimeoutError) as exc:
        raise PacsTimeoutError(f"timed out waiting for the server{where}", **kwargs) from exc
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        requests.exceptions.InvalidHeader,
    ) as exc:
        raise ConfigurationError(f"bad URL or header{where}: {type(exc).__name__}", **kwargs) from exc
    except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError) as exc:
        raise TransientNetworkError(f"connection broken mid-response{where}", **kwargs) from exc
    except requests.exceptions.ContentDecodingError as exc:
        raise PayloadInvalidError(f"response body could not be decoded{where}", **kwargs) from exc
    except (requests.exceptions.ConnectionError, ConnectionError) as exc:
        raise TransientNetworkError(f"could not connect to the server{where}", **kwargs) from exc
    except requests.exceptions.RequestException as exc:
        raise TransientNetworkError(f"HTTP request failed{where}: {type(exc).__name__}", **kwargs) from exc


def request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    source: str | None = None,
    reference: Any = None,
    headers: Mapping[str, str] | None = None,
    params: Any = None,
    data: Any = None,
    stream: bool = False,
    timeout: float | tuple[float, float] | None = None,
    ok_statuses: tuple[int, ...] = (),
    allow_redirects: bool = True,
) -> requests.Response:
    """Send one request over ``session`` and return a success response, or raise the mapped error.

    Parameters
    ----------
    ok_statuses
        Error statuses the caller handles itself (returned, not raised), for example a login flow's 401.
    allow_redirects
        Follow 3xx answers (requests drops an Authorization header on a redirect to another host, but not the
        headers a login sends itself: a login passes False).
    """
    all_headers = {"Accept-Encoding": "identity"}
    if headers:
        all_headers.update(headers)
    with mapped_errors(source=source, reference=reference, url=url):
        response = session.request(
            method,
            url,
            headers=all_headers,
            params=params,
            data=data,
            stream=stream,
            timeout=timeout or DEFAULT_TIMEOUT,
            allow_redirects=allow_redirects,
        )
    if response.status_code not in ok_statuses:
        raise_for_status(response, source=source, reference=reference)
    return response


def iter_body(
    response: requests.Response,
    *,
    source: str | None = None,
    reference: Any = None,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[bytes]:
    """Yield a streamed response's body in chunks, with transport errors mapped. Memory is one chunk."""
    with mapped_errors(source=source, reference=reference, url=response.url or ""):
        yield from response.iter_content(chunk_size=chunk_size)


def bounded(
    chunks: Iterable[bytes], limit: int, *, what: str, source: str | None = None, reference: Any = None
) -> Iterator[bytes]:
    """``chunks`` passed on until more than ``limit`` bytes came, then RequestRejectedError: the server's answer is
    larger than we accept, and asking again would bring the same answer. Checked as the bytes arrive, so memory
    and disk never hold more than ``limit`` (plus one chunk) of it."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise RequestRejectedError(
                f"{what} is larger than {limit} bytes, the most accepted (raise the profile's limit if it is genuine)",
                source=source,
                reference=reference,
            )
        yield chunk


def read_body(
    response: requests.Response,
    *,
    limit: int = DEFAULT_MAX_ANSWER_BYTES,
    source: str | None = None,
    reference: Any = None,
) -> bytes:
    """The whole body of a response, at most ``limit`` bytes (else RequestRejectedError, before reading more than
    that), with transport errors mapped. For small answers (JSON, XML) only."""
    what = f"the answer from {redact_url(response.url or '')}"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        response.close()
        raise RequestRejectedError(
            f"{what} announces {declared} bytes, more than the {limit} accepted", source=source, reference=reference
        )
    chunks = iter_body(response, source=source, reference=reference)
    try:
        return b"".join(bounded(chunks, limit, what=what, source=source, reference=reference))
    except RequestRejectedError:
        response.close()
        raise


SessionOrFactory = requests.Session | Callable[[], requests.Session] | None
"""What an HTTP client is given: a session the caller owns, or a way to make one (then the client owns it)."""


class EndpointOptions(TypedDict, total=False):
    """The keyword options every HTTP searcher and downloader takes, passed on to :class:`HTTPEndpoint`."""

    source: str | None
    timeout: float | tuple[float, float] | None
    request_tries: int
    max_answer_bytes: int
    max_instance_bytes: int


class HTTPEndpoint:
    """What every HTTP searcher and downloader holds: the session it reuses (keep-alive), its root URL, a name for
    errors and logs without credentials, and its ``(connect, read)`` timeout.

    This is the one constructor of the six HTTP clients (QIDO-RS, WADO-RS metadata, MINT, WADO-RS, WADO-URI,
    RAD-69); those with options of their own take them and hand the rest on as :class:`EndpointOptions`.

    Parameters
    ----------
    session
        A ``requests.Session`` the caller made (possibly logged in, see :mod:`trolley_tasks.transports.auth`): it is
        reused and never closed here, since the caller may share it. Or a callable that makes one, or None for a
        plain ``requests.Session()``: that session is this client's own and :meth:`close` closes it.
    url
        The service root; a trailing ``/`` is dropped, since every path is appended with one.
    source
        Name used in errors and logs; defaults to the URL without credentials.
    timeout
        ``(connect, read)`` seconds, or one number for both; None means :data:`DEFAULT_TIMEOUT`.
    request_tries
        Tries of one small idempotent request (a search page, a metadata answer) before its error is raised
        (:func:`retrying`); 1 asks once. Instance downloads are never retried here.
    max_answer_bytes
        The largest answer read into memory (a search, metadata, a SOAP envelope): more is request-rejected.
    max_instance_bytes
        The largest instance streamed to storage: more is request-rejected (a searcher has none to stream).
    """

    source: str | None

    def __init__(
        self,
        session: SessionOrFactory,
        url: str,
        *,
        source: str | None = None,
        timeout: float | tuple[float, float] | None = None,
        request_tries: int = REQUEST_TRIES,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ) -> None:
        if request_tries < 1:
            raise ValueError("request_tries must be at least 1")
        if max_answer_bytes < 1 or max_instance_bytes < 1:
            raise ValueError("max_answer_bytes and max_instance_bytes must be positive")
        self.request_tries = request_tries
        self.max_answer_bytes = max_answer_bytes
        self.max_instance_bytes = max_instance_bytes
        self.owns_session = not isinstance(session, requests.Session)
        if isinstance(session, requests.Session):
            self.session = session
        else:
            self.session = session() if session is not None else requests.Session()
        self.url = url.rstrip("/")
        self.source = source or redact_url(url)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def close(self) -> None:
        """Close the session's pooled connections if this client made the session; a caller's session stays open."""
        if self.owns_session:
            self.session.close()


def get_dicom_json(endpoint: HTTPEndpoint, url: str, reference: Any) -> list[Dataset] | None:
    """The datasets of a WADO-RS metadata answer (PS3.18 10.4.1.1.2) at ``url``, or None when the server has none
    (404, Orthanc's answer for an unknown UID, or 204). Retried as one small idempotent request
    (:func:`retrying`); every other failure is raised from the error tree. Bulk data is never fetched."""

    def once() -> list[Dataset] | None:
        try:
            response = request(
                endpoint.session,
                "GET",
                url,
                source=endpoint.source,
                reference=reference,
                headers={"Accept": "application/dicom+json"},
                timeout=endpoint.timeout,
            )
        except NotFoundError:
            return None
        if response.status_code == 204:
            response.close()
            return None
        body = read_body(response, limit=endpoint.max_answer_bytes, source=endpoint.source, reference=reference)
        return datasets_from_json(body, source=endpoint.source, what=f"WADO-RS metadata from {redact_url(url)}")

    return retrying(once, tries=endpoint.request_tries)
