"""The SOAP side of IHE RAD-69: the request envelope, an incremental reader of the answer, and the XDS error map.

RAD-69 (IHE RAD TF-3 4.69, built on ITI-43 Retrieve Document Set) is a SOAP 1.2 call. The answer's SOAP part can be
large (a Vitrea answer lists every document, and vendors add their own elements), so it is never held whole: it is fed
chunk by chunk to an expat parser whose target keeps only what we need -- the RegistryResponse status, the
RegistryErrors, each DocumentResponse's ids and ``xop:Include`` reference, and a SOAP Fault -- and drops every other
byte of text as it arrives. The answer comes from a server we do not control, so the parser is defusedxml's: DTDs,
entities and external references are refused (no entity expansion bombs, no reads of local files), as for MINT.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote
from xml.etree.ElementTree import ParseError
from xml.sax.saxutils import escape, quoteattr

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import XMLParser

from trolley_tasks.core import InstanceReference, group_by_series
from trolley_tasks.errors import (
    NotFoundError,
    PayloadInvalidError,
    RequestRejectedError,
    RetrievalError,
    ServerBusyError,
    ServerError,
)

ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
SOAP_NS = "http://www.w3.org/2003/05/soap-envelope"
WSA_NS = "http://www.w3.org/2005/08/addressing"
IHERAD_NS = "urn:ihe:rad:xdsi-b:2009"
IHE_NS = "urn:ihe:iti:xds-b:2007"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
MAX_TEXT = 4096
"""Longest text kept from one element (a UID, an error context): anything longer is cut, never accumulated."""


# --------------------------------------------------------------------------------------------------------------------
# XDS errors (ITI TF-3 4.2.4.1, error codes). Each is also a class of the error tree, which sets the retry policy.


class XDSMissingDocumentError(NotFoundError):
    """``XDSMissingDocument``: the repository does not hold the document (instance) asked for."""


class XDSUnknownRepositoryError(RequestRejectedError):
    """``XDSUnknownRepositoryId``: the RepositoryUniqueId we sent is wrong for this server (a configuration matter)."""


class XDSRepositoryBusyError(ServerBusyError):
    """``XDSRepositoryBusy`` / ``...OutOfResources``: ask again later, and less."""


class XDSRepositoryError(ServerError):
    """``XDSRepositoryError`` / ``XDSRegistryError`` or a code we do not know: the server failed on its side."""


XDS_ERRORS: dict[str, type[RetrievalError]] = {
    "XDSMissingDocument": XDSMissingDocumentError,
    "XDSUnknownRepositoryId": XDSUnknownRepositoryError,
    "XDSRepositoryBusy": XDSRepositoryBusyError,
    "XDSRegistryBusy": XDSRepositoryBusyError,
    "XDSRepositoryOutOfResources": XDSRepositoryBusyError,
    "XDSRegistryOutOfResources": XDSRepositoryBusyError,
    "XDSRepositoryError": XDSRepositoryError,
    "XDSRegistryError": XDSRepositoryError,
}


@dataclass(frozen=True)
class RegistryError:
    """One ``rs:RegistryError`` of a RegistryResponse."""

    error_code: str
    code_context: str
    severity: str
    location: str

    @property
    def is_warning(self) -> bool:
        return self.severity.endswith(":Warning")

    def concerns(self, reference: InstanceReference) -> bool:
        """Whether the server named this instance (its DocumentUniqueId) in the error's context or location."""
        return reference.instance_uid in self.code_context or reference.instance_uid in self.location

    def exception(self, *, source: str | None, reference: object) -> RetrievalError:
        error_type = XDS_ERRORS.get(self.error_code, XDSRepositoryError)
        context = f": {self.code_context}" if self.code_context else ""
        return error_type(f"RAD-69 {self.error_code or 'error'}{context}", source=source, reference=reference)


@dataclass(frozen=True)
class DocumentResponse:
    """One ``DocumentResponse``: which document, and the Content-ID of the MIME part holding it."""

    document_uid: str
    repository_uid: str
    mime_type: str
    content_id: str | None


@dataclass
class SoapFault:
    code: str = ""
    subcode: str = ""
    reason: str = ""

    def exception(self, *, source: str | None, reference: object) -> RetrievalError:
        """SOAP 1.2 Part 1 5.4.6: a Receiver fault is the server's failure, anything else (Sender, VersionMismatch,
        MustUnderstand) says our request was wrong."""
        local = self.code.rpartition(":")[2]
        detail = f"RAD-69 SOAP fault {local or '?'}" + (f" ({self.subcode})" if self.subcode else "")
        detail += f": {self.reason}" if self.reason else ""
        error_type = ServerError if local == "Receiver" else RequestRejectedError
        return error_type(detail, source=source, reference=reference)


@dataclass
class SoapAnswer:
    """What we keep of a RAD-69 SOAP answer."""

    status: str = ""
    errors: list[RegistryError] = field(default_factory=list)
    documents: list[DocumentResponse] = field(default_factory=list)
    fault: SoapFault | None = None


class _AnswerTarget:
    """An ElementTree parser target that builds a :class:`SoapAnswer` and discards everything else.

    Elements are matched by local name: vendors differ in prefixes, and the names are unambiguous in this answer.
    """

    _KEPT_TEXT = {"DocumentUniqueId", "RepositoryUniqueId", "mimeType", "Value", "Text"}

    def __init__(self) -> None:
        self.answer = SoapAnswer()
        self._path: list[str] = []
        self._text: list[str] = []
        self._text_size = 0
        self._document: dict[str, str] = {}
        self._inline = False

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        name = tag.rpartition("}")[2]
        self._path.append(name)
        self._text, self._text_size = [], 0
        if name == "RegistryResponse":
            self.answer.status = attrib.get("status", "")
        elif name == "RegistryError":
            self.answer.errors.append(
                RegistryError(
                    attrib.get("errorCode", ""),
                    attrib.get("codeContext", "")[:MAX_TEXT],
                    attrib.get("severity", ""),
                    attrib.get("location", "")[:MAX_TEXT],
                )
            )
        elif name == "DocumentResponse":
            self._document, self._inline = {}, False
        elif name == "Include" and "DocumentResponse" in self._path:
            href = attrib.get("href", "")
            self._document["content_id"] = unquote(href[4:]) if href.lower().startswith("cid:") else href
        elif name == "Fault":
            self.answer.fault = SoapFault()

    def data(self, text: str) -> None:
        name = self._path[-1] if self._path else ""
        if name == "Document" and text.strip():
            self._inline = True
        if name in self._KEPT_TEXT and self._text_size < MAX_TEXT:
            self._text.append(text[: MAX_TEXT - self._text_size])
            self._text_size += len(self._text[-1])

    def end(self, tag: str) -> None:
        name = self._path.pop()
        text = "".join(self._text).strip()
        self._text, self._text_size = [], 0
        if "DocumentResponse" in self._path or name == "DocumentResponse":
            self._end_in_document(name, text)
        elif self.answer.fault is not None and "Fault" in self._path:
            parent = self._path[-1]
            if name == "Value" and parent == "Code":
                self.answer.fault.code = text
            elif name == "Value" and parent == "Subcode":
                self.answer.fault.subcode = text
            elif name == "Text" and parent == "Reason":
                self.answer.fault.reason = text

    def _end_in_document(self, name: str, text: str) -> None:
        if name in ("DocumentUniqueId", "RepositoryUniqueId", "mimeType"):
            self._document[name] = text
        elif name == "DocumentResponse":
            if self._inline and "content_id" not in self._document:
                raise PayloadInvalidError(
                    "RAD-69 answer inlines a document as base64 instead of an MTOM/XOP part: not supported"
                )
            self.answer.documents.append(
                DocumentResponse(
                    self._document.get("DocumentUniqueId", ""),
                    self._document.get("RepositoryUniqueId", ""),
                    self._document.get("mimeType", ""),
                    self._document.get("content_id"),
                )
            )

    def close(self) -> SoapAnswer:
        return self.answer


def read_answer(chunks: Iterable[bytes], *, source: str | None = None, reference: object = None) -> SoapAnswer:
    """Parse a SOAP answer fed as chunks; memory is one chunk plus what :class:`SoapAnswer` keeps."""
    target = _AnswerTarget()
    parser = XMLParser(target=target, forbid_dtd=True)
    try:
        for chunk in chunks:
            parser.feed(chunk)
        parser.close()
    except ParseError as exc:
        raise PayloadInvalidError(
            f"RAD-69 SOAP answer is not valid XML: {exc}", source=source, reference=reference
        ) from exc
    except DefusedXmlException as exc:
        raise PayloadInvalidError(
            f"RAD-69 SOAP answer uses a forbidden XML feature: {exc!r}", source=source, reference=reference
        ) from exc
    except PayloadInvalidError as exc:
        raise PayloadInvalidError(exc.message, source=source, reference=reference) from exc
    return target.answer


def request_envelope(
    url: str,
    references: Sequence[InstanceReference],
    *,
    repository_unique_id: str,
    transfer_syntaxes: Sequence[str],
) -> bytes:
    """The SOAP 1.2 RetrieveImagingDocumentSetRequest for ``references`` (PROTOCOLS.md, IHE RAD TF-3 4.69.4.1).

    Documents are grouped under one StudyRequest and SeriesRequest per study and series, in the order given.
    """
    studies: dict[str, dict[str, list[str]]] = {}
    for series_ref, refs in group_by_series(references).items():
        studies.setdefault(series_ref.study_uid, {})[series_ref.series_uid] = [ref.instance_uid for ref in refs]
    repository = escape(repository_unique_id)
    body: list[str] = []
    for study_uid, series in studies.items():
        body.append(f"<iherad:StudyRequest studyInstanceUID={quoteattr(study_uid)}>")
        for series_uid, instance_uids in series.items():
            body.append(f"<iherad:SeriesRequest seriesInstanceUID={quoteattr(series_uid)}>")
            body.extend(
                "<ihe:DocumentRequest>"
                f"<ihe:RepositoryUniqueId>{repository}</ihe:RepositoryUniqueId>"
                f"<ihe:DocumentUniqueId>{escape(uid)}</ihe:DocumentUniqueId>"
                "</ihe:DocumentRequest>"
                for uid in instance_uids
            )
            body.append("</iherad:SeriesRequest>")
        body.append("</iherad:StudyRequest>")
    syntaxes = "".join(f"<iherad:TransferSyntaxUID>{escape(ts)}</iherad:TransferSyntaxUID>" for ts in transfer_syntaxes)
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<s:Envelope xmlns:s="{SOAP_NS}" xmlns:a="{WSA_NS}">'
        "<s:Header>"
        f'<a:Action s:mustUnderstand="1">{ACTION}</a:Action>'
        f"<a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>"
        f"<a:ReplyTo><a:Address>{WSA_NS}/anonymous</a:Address></a:ReplyTo>"
        f'<a:To s:mustUnderstand="1">{escape(url)}</a:To>'
        "</s:Header>"
        "<s:Body>"
        f'<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="{IHERAD_NS}" xmlns:ihe="{IHE_NS}">'
        + "".join(body)
        + f"<iherad:TransferSyntaxUIDList>{syntaxes}</iherad:TransferSyntaxUIDList>"
        "</iherad:RetrieveImagingDocumentSetRequest>"
        "</s:Body>"
        "</s:Envelope>"
    ).encode("utf-8")
