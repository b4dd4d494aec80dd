"""WADO-URI (PS3.18 chapter 9): one HTTP GET per instance.

``GET {url}?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=application/dicom`` returns the
instance as stored. The query string is written by hand rather than from a ``params`` dict: requests would send
``contentType=application%2Fdicom``, which Orthanc answers with 400 (ORTHANC.md). UIDs are digits and dots (validated
by the references), so nothing else in the query needs escaping.

A batch keeps up to ``max_in_flight`` requests running at once (:mod:`~trolley_tasks.downloaders.in_flight`), and
hands the answers back in the order asked. Each request's thread reads its answer's first ``PREFETCH_BYTES`` into
memory, which is the whole of a typical instance (a 512x512 CT slice is 0.5 MB); the rest of a larger one is
streamed by the caller as it writes, so a 500 MB enhanced multi-frame instance never sits in memory, and a worker
holds at most ``max_in_flight`` x ``PREFETCH_BYTES`` of answers. What it gave in the bench's WADO-URI runs (1,000
instances of 0.5 MB, 2 worker processes) is in docs/performance.md, "What was tuned".

The default is one request at a time, as before: the engine holds one concurrency slot of the source per batch and
counts a slot per request (DESIGN.md: a global cap on what all workers together ask of one PACS), so a second
request at once needs a second slot. Given a ``request_gate`` (the engine's throttle satisfies
:class:`~trolley_tasks.downloaders.in_flight.RequestGate`), each request beyond the first takes a slot from it, and
the batch runs fewer at once when the cap is reached. A caller under no shared cap (a script with
:class:`~trolley_tasks.trolley.Trolley`) may raise ``max_in_flight`` without a gate.

The first bytes are parsed (file meta and dataset up to SeriesInstanceUID,
:func:`~trolley_tasks.formats.part10.read_header`) to make sure the server sent the instance asked for; that header
travels with the chunks to storage (:class:`~trolley_tasks.formats.part10.Part10Stream`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Unpack

import requests

from trolley_tasks.core import Downloadable, InstanceReference
from trolley_tasks.downloaders.base import AS_STORED, DownloaderBase, RawPayload, checked_transfer_syntax
from trolley_tasks.downloaders.in_flight import RequestGate, in_order
from trolley_tasks.downloaders.shortfall import Shortfall, instance_refs_or_raise
from trolley_tasks.errors import NotFoundError, PayloadInvalidError
from trolley_tasks.formats.part10 import check_identity, read_header
from trolley_tasks.transports import http

PREFETCH_BYTES = 4 * 1024 * 1024
"""How much of an answer a request's thread reads ahead into memory; the rest streams in the caller's thread."""


@dataclass
class _Answer:
    """An answer whose first bytes were read by a request's thread; ``rest`` streams the remainder, if any."""

    response: requests.Response
    head: list[bytes]
    rest: Iterator[bytes] | None

    def chunks(self) -> Iterator[bytes]:
        return itertools.chain(self.head, self.rest) if self.rest is not None else iter(self.head)

    def close(self) -> None:
        self.response.close()


class WadoURI(http.HTTPEndpoint, DownloaderBase):
    """A WADO-URI endpoint, for example Orthanc's ``http://host:8042/wado``.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The WADO-URI endpoint, without query string.
    transfer_syntax
        ``"*"`` (the default: no ``transferSyntax`` parameter, and Orthanc and most archives send the file as stored)
        or a transfer syntax UID, sent as the ``transferSyntax`` query parameter (PS3.18 chapter 9); a file that
        comes back in another syntax is an invalid payload.
    max_in_flight
        Requests running at once per call of :meth:`iter_raw`: 1 (the default) sends them one after another; 4 gives
        the engine's two worker processes the 8 requests at once of the reference client's 8 threads
        (docs/performance.md). A session's connection pool keeps 10 connections per host alive (requests'
        default), so more than 10 would open and close connections.
    request_gate
        Where each request beyond the first takes its permission (see the module docstring); None: ``max_in_flight``
        alone bounds them.
    """

    def __init__(
        self,
        session: http.SessionOrFactory,
        url: str,
        *,
        transfer_syntax: str = AS_STORED,
        max_in_flight: int = 1,
        request_gate: RequestGate | None = None,
        **endpoint: Unpack[http.EndpointOptions],
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        super().__init__(session, url, **endpoint)
        self.transfer_syntax = checked_transfer_syntax(transfer_syntax, "WADO-URI")
        self.max_in_flight = max_in_flight
        self.request_gate = request_gate

    def __repr__(self) -> str:
        return f"WadoURI(url={http.redact_url(self.url)!r}, transfer_syntax={self.transfer_syntax!r})"

    def instance_url(self, reference: InstanceReference) -> str:
        """The request URL for one instance, with ``contentType=application/dicom`` left unescaped."""
        separator = "&" if "?" in self.url else "?"
        return (
            f"{self.url}{separator}requestType=WADO&studyUID={reference.study_uid}"
            f"&seriesUID={reference.series_uid}&objectUID={reference.instance_uid}&contentType=application/dicom"
            + (f"&transferSyntax={self.transfer_syntax}" if self.transfer_syntax != AS_STORED else "")
        )

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Stream each instance. Raises NonInstanceParameterError now (before any request) for studies or series
        without instance information; a missing instance is raised after the others were delivered."""
        references = instance_refs_or_raise(objects, source=self.source, what="WADO-URI")
        return self._fetch(references)

    def _get(self, reference: InstanceReference) -> _Answer:
        """One request, on a thread of :func:`in_order`: the response and its first ``PREFETCH_BYTES``."""
        response = http.request(
            self.session,
            "GET",
            self.instance_url(reference),
            source=self.source,
            reference=reference,
            stream=True,
            timeout=self.timeout,
        )
        try:
            body = http.bounded(
                http.iter_body(response, source=self.source, reference=reference),
                self.max_instance_bytes,
                what=f"instance {reference.instance_uid}",
                source=self.source,
                reference=reference,
            )
            head: list[bytes] = []
            size = 0
            for chunk in body:
                head.append(chunk)
                size += len(chunk)
                if size >= PREFETCH_BYTES:
                    return _Answer(response, head, body)
            return _Answer(response, head, None)
        except BaseException:
            response.close()
            raise

    def _fetch(self, references: list[InstanceReference]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        shortfall = Shortfall(self.source)
        answers = in_order(
            references,
            self._get,
            limit=self.max_in_flight,
            release=_Answer.close,
            gate=self.request_gate,
            name="wado-uri",
        )
        with contextlib.closing(answers):  # stopped early: the requests still running are waited for and closed
            for reference, future in answers:
                try:
                    answer = future.result()
                except NotFoundError as exc:
                    shortfall.add(exc)
                    continue
                try:
                    yield reference, self._checked(reference, answer)
                finally:
                    answer.close()
        shortfall.raise_if_any()

    def _checked(self, reference: InstanceReference, answer: _Answer) -> RawPayload:
        """The answer as a stream with its header read, once it is the instance asked for in the syntax asked for."""
        payload = read_header(answer.chunks(), source=self.source, reference=reference)
        header = payload.header
        assert header is not None  # read_header sets it
        check_identity(header, reference, source=self.source)
        if self.transfer_syntax not in (AS_STORED, header.transfer_syntax_uid):
            raise PayloadInvalidError(
                f"asked for transfer syntax {self.transfer_syntax}, the file meta TransferSyntaxUID is "
                f"{header.transfer_syntax_uid}",
                source=self.source,
                reference=reference,
            )
        return payload
