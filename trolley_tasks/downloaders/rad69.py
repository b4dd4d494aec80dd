"""IHE RAD-69 Retrieve Imaging Document Set (XDS-I.b): DICOM instances over SOAP 1.2 with MTOM/XOP.

One POST per series carries one DocumentRequest per instance (grouped under its StudyRequest and SeriesRequest). The
answer is ``multipart/related`` (MTOM, W3C XOP): a SOAP part whose DocumentResponses point with
``xop:Include href="cid:..."`` at the MIME parts that hold the DICOM files. Everything is read incrementally: the SOAP
part through an expat parser (:mod:`~trolley_tasks.downloaders.rad69_soap`), each document as a chunk stream
identified by its Content-ID and checked against its first bytes.

Errors: a SOAP Fault becomes ServerError (Receiver) or RequestRejectedError (anything else); each RegistryError
becomes its XDS class (``XDSMissingDocumentError`` is a NotFoundError). Classes listed in ``errors_to_ignore`` skip
the documents they concern, with a log line, as in dicomtrolley::

    Rad69(session, url, errors_to_ignore=[XDSMissingDocumentError])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Unpack

import requests

from trolley_tasks.core import Downloadable, InstanceReference, SeriesReference, group_by_series
from trolley_tasks.downloaders.base import DownloaderBase, RawPayload
from trolley_tasks.downloaders.rad69_soap import (
    ACTION,
    RegistryError,
    SoapAnswer,
    XDSMissingDocumentError,
    XDSRepositoryBusyError,
    XDSRepositoryError,
    XDSUnknownRepositoryError,
    read_answer,
    request_envelope,
)
from trolley_tasks.downloaders.shortfall import Shortfall, instance_refs_or_raise
from trolley_tasks.errors import NotFoundError, PayloadInvalidError
from trolley_tasks.formats.multipart import iter_parts, parse_content_type
from trolley_tasks.formats.part10 import check_identity, read_header
from trolley_tasks.transports import http

__all__ = [
    "DEFAULT_TRANSFER_SYNTAXES",
    "Rad69",
    "XDSMissingDocumentError",
    "XDSRepositoryBusyError",
    "XDSRepositoryError",
    "XDSUnknownRepositoryError",
]

logger = logging.getLogger("trolley.downloaders.rad69")

DEFAULT_REPOSITORY_UNIQUE_ID = "1.3.6.1.4.1.21367.13.80.110"

DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1 (Vitrea's usual)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
"""What we accept when not told otherwise: every syntax pydicom can store as-is, so the server need not transcode."""

_SOAP_TYPES = {"application/soap+xml", "application/xop+xml", "text/xml", "application/xml"}


class Rad69(http.HTTPEndpoint, DownloaderBase):
    """A RAD-69 Imaging Document Source.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The RAD-69 endpoint.
    errors_to_ignore
        Exception classes (from :mod:`~trolley_tasks.downloaders.rad69_soap`, e.g. ``XDSMissingDocumentError``)
        that skip the documents they concern instead of raising.
    repository_unique_id
        The RepositoryUniqueId put in every DocumentRequest (the server's repository OID).
    transfer_syntaxes
        The TransferSyntaxUIDList sent; a document in any other syntax is refused as an invalid payload.
    """

    def __init__(
        self,
        session: http.SessionOrFactory,
        url: str,
        *,
        errors_to_ignore: Sequence[type[Exception]] = (),
        repository_unique_id: str = DEFAULT_REPOSITORY_UNIQUE_ID,
        transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
        **endpoint: Unpack[http.EndpointOptions],
    ) -> None:
        super().__init__(session, url, **endpoint)
        self.errors_to_ignore = tuple(errors_to_ignore)
        self.repository_unique_id = repository_unique_id
        self.transfer_syntaxes = tuple(transfer_syntaxes)

    def __repr__(self) -> str:
        ignored = [cls.__name__ for cls in self.errors_to_ignore]
        return f"Rad69(url={http.redact_url(self.url)!r}, errors_to_ignore={ignored})"

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Stream each instance, one SOAP request per series. NonInstanceParameterError is raised now, before any
        request, for objects without instance information."""
        references = instance_refs_or_raise(objects, source=self.source, what="RAD-69")
        return self._fetch(list(group_by_series(references).values()))

    def _fetch(self, groups: list[list[InstanceReference]]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        shortfall = Shortfall(self.source)
        for group in groups:
            try:
                yield from self._fetch_series(group, shortfall)
            except NotFoundError as exc:
                shortfall.add(exc)
        shortfall.raise_if_any()

    def create_instance_request(self, instance: InstanceReference) -> str:
        """The SOAP request body for one instance (dicomtrolley's name); see :meth:`create_instances_request`."""
        return self.create_instances_request([instance])

    def create_instances_request(self, instances: Sequence[InstanceReference]) -> str:
        """The SOAP 1.2 RetrieveImagingDocumentSetRequest this downloader posts for ``instances``, as text.

        dicomtrolley renders a jinja2 template (``xml_templates.RAD69_SOAP_REQUEST_TEMPLATE``); this is built by
        :func:`~trolley_tasks.downloaders.rad69_soap.request_envelope`, every value XML-escaped, with this
        downloader's repository id and transfer syntaxes.
        """
        return self._envelope(list(instances)).decode("utf-8")

    def _envelope(self, group: list[InstanceReference]) -> bytes:
        return request_envelope(
            self.url, group, repository_unique_id=self.repository_unique_id, transfer_syntaxes=self.transfer_syntaxes
        )

    def _post(self, group: list[InstanceReference]) -> requests.Response:
        envelope = self._envelope(group)
        return http.request(
            self.session,
            "POST",
            self.url,
            source=self.source,
            reference=group[0].series(),
            headers={"Content-Type": f'application/soap+xml; charset=utf-8; action="{ACTION}"'},
            data=envelope,
            stream=True,
            timeout=self.timeout,
            ok_statuses=(400, 500),  # a SOAP Fault travels with these; its text beats the bare status
        )

    def _bounded_answer(self, chunks: Iterable[bytes], series: SeriesReference) -> Iterator[bytes]:
        """The SOAP envelope's chunks, at most ``max_answer_bytes`` of them: the parser keeps what it reads."""
        return http.bounded(
            chunks, self.max_answer_bytes, what="the RAD-69 SOAP envelope", source=self.source, reference=series
        )

    def _fetch_series(
        self, group: list[InstanceReference], shortfall: Shortfall
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        series = group[0].series()
        asked = {ref.instance_uid: ref for ref in group}
        delivered: set[InstanceReference] = set()
        response = self._post(group)
        try:
            media_type, params = parse_content_type(response.headers.get("Content-Type", ""))
            body = http.iter_body(response, source=self.source, reference=series)
            if media_type.startswith("multipart/"):
                parts = iter_parts(body, response.headers.get("Content-Type"), source=self.source, reference=series)
                root = next(parts, None)
                if root is None:
                    raise PayloadInvalidError("RAD-69 answer has no SOAP part", source=self.source, reference=series)
                start = params.get("start", "").strip().removeprefix("<").removesuffix(">")
                if start and root.content_id != start:
                    raise PayloadInvalidError(
                        f"RAD-69 answer's first part is {root.content_id!r}, not the SOAP root {start!r}",
                        source=self.source,
                        reference=series,
                    )
                answer = read_answer(self._bounded_answer(root, series), source=self.source, reference=series)
            elif media_type in _SOAP_TYPES:
                answer_chunks = self._bounded_answer(body, series)
                parts, answer = iter(()), read_answer(answer_chunks, source=self.source, reference=series)
            else:
                error = http.error_for_status(response, source=self.source, reference=series)
                raise error or PayloadInvalidError(
                    f"RAD-69 answer has Content-Type {media_type!r}, not multipart/related or SOAP",
                    source=self.source,
                    reference=series,
                )
            self._raise_for_answer(response, answer, series)
            by_content_id = {doc.content_id: doc for doc in answer.documents if doc.content_id}
            for part in parts:
                document = by_content_id.get(part.content_id or "")
                reference = asked.get(document.document_uid) if document else None
                if reference is None or reference in delivered:
                    logger.warning("skipping RAD-69 part %s: no DocumentResponse asked for it", part.content_id)
                    continue
                chunks = http.bounded(
                    part,
                    self.max_instance_bytes,
                    what=f"document {part.content_id}",
                    source=self.source,
                    reference=reference,
                )
                payload = read_header(chunks, source=self.source, reference=reference)
                header = payload.header
                assert header is not None  # read_header sets it
                check_identity(header, reference, source=self.source)
                if header.transfer_syntax_uid not in self.transfer_syntaxes:
                    raise PayloadInvalidError(
                        f"document in transfer syntax {header.transfer_syntax_uid}, which we did not accept",
                        source=self.source,
                        reference=reference,
                    )
                delivered.add(reference)
                yield reference, payload
        finally:
            response.close()
        self._account(group, delivered, answer.errors, shortfall)

    def _raise_for_answer(self, response: requests.Response, answer: SoapAnswer, series: object) -> None:
        if answer.fault is not None:
            raise answer.fault.exception(source=self.source, reference=series)
        error = http.error_for_status(response, source=self.source, reference=series)
        if error is not None:
            raise error

    def _account(
        self,
        group: list[InstanceReference],
        delivered: set[InstanceReference],
        errors: list[RegistryError],
        shortfall: Shortfall,
    ) -> None:
        """Decide, for each instance asked and not delivered, whether it is skipped, deferred or raised."""
        for warning in (error for error in errors if error.is_warning):
            logger.warning("RAD-69 warning %s: %s", warning.error_code, warning.code_context)
        failures = [error for error in errors if not error.is_warning]
        unattributed = [error for error in failures if not any(error.concerns(ref) for ref in group)]
        used: set[RegistryError] = set()
        unexplained: list[InstanceReference] = []
        for ref in (ref for ref in group if ref not in delivered):
            reasons = [error for error in failures if error.concerns(ref)] or unattributed
            if not reasons:
                unexplained.append(ref)
                continue
            used.update(reasons)
            exceptions = [reason.exception(source=self.source, reference=ref) for reason in reasons]
            raised = [exc for exc in exceptions if not isinstance(exc, self.errors_to_ignore)]
            if not raised:
                logger.warning("skipping %s: %s (ignored)", ref, "; ".join(exc.message for exc in exceptions))
            elif isinstance(raised[0], NotFoundError):
                shortfall.add(raised[0])
            else:
                raise raised[0]
        shortfall.missing(unexplained, "the RAD-69 answer neither sent them nor reported an error")
        for error in failures:
            if error not in used:
                logger.warning("RAD-69 %s for documents that were delivered: %s", error.error_code, error.code_context)
