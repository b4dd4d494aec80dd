"""Answers for :mod:`tests.fakehttp` that Orthanc cannot give: multipart bodies (whole or truncated) and RAD-69
(no public server exists).

The RAD-69 responder is written from the wire facts in /work/shared/seeds/PROTOCOLS.md (IHE RAD TF-3 4.69,
ITI TF-3 4.2.4.1), not from any implementation.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from tests.fakehttp import FakeRequest, Reply
from trolley_tasks.downloaders.rad69_soap import IHE_NS, IHERAD_NS, SOAP_NS


def multipart(parts: Iterable[tuple[Mapping[str, str], bytes]], boundary: str, *, close: bool = True) -> bytes:
    """A multipart body; ``close=False`` leaves out the close delimiter (a truncated answer)."""
    out = bytearray()
    for headers, body in parts:
        out += f"--{boundary}\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        out += b"\r\n" + body + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


# --------------------------------------------------------------------------------------------------------------------
# RAD-69


@dataclass
class Rad69Responder:
    """A RAD-69 Imaging Document Source serving ``documents`` (SOPInstanceUID -> Part 10 bytes).

    Documents asked for and not held get an ``XDSMissingDocument`` RegistryError naming them (status
    PartialSuccess, or Failure when none is found). ``fault`` answers every call with that SOAP Fault code (HTTP
    500); ``padding`` adds that many bytes of vendor text to the SOAP part, generated lazily.
    """

    documents: Mapping[str, bytes]
    fault: str | None = None
    padding: int = 0
    error_code: str = "XDSMissingDocument"
    boundary: str = "MIMEBoundary_rad69_fake"
    requests: list[ET.Element] = field(default_factory=list)

    def __call__(self, request: FakeRequest) -> Reply:
        envelope = ET.fromstring(request.body)
        self.requests.append(envelope)
        if self.fault:
            return Reply(500, [self._fault()], {"Content-Type": "application/soap+xml; charset=utf-8"})
        asked = [element.text or "" for element in envelope.iter(f"{{{IHE_NS}}}DocumentUniqueId")]
        found = [uid for uid in asked if uid in self.documents]
        missing = [uid for uid in asked if uid not in self.documents]
        content_type = (
            f'multipart/related; type="application/xop+xml"; start="<soap@fake>"; '
            f'start-info="application/soap+xml"; boundary="{self.boundary}"'
        )
        return Reply(200, self._body(found, missing), {"Content-Type": content_type})

    def _fault(self) -> bytes:
        return (
            f'<s:Envelope xmlns:s="{SOAP_NS}"><s:Body><s:Fault>'
            f"<s:Code><s:Value>s:{self.fault}</s:Value><s:Subcode><s:Value>a:InternalError</s:Value></s:Subcode>"
            '</s:Code><s:Reason><s:Text xml:lang="en">The repository database is offline</s:Text></s:Reason>'
            "</s:Fault></s:Body></s:Envelope>"
        ).encode()

    def _body(self, found: list[str], missing: list[str]) -> Iterator[bytes]:
        status = "Success" if not missing else ("PartialSuccess" if found else "Failure")
        yield (
            f"--{self.boundary}\r\nContent-ID: <soap@fake>\r\n"
            'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n\r\n'
            f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP_NS}"><s:Header>'
        ).encode()
        if self.padding:
            yield b'<v:Padding xmlns:v="urn:example:vendor">'
            block = b"vendor-padding " * 65536  # ~1 MB
            sent = 0
            while sent < self.padding:
                piece = block[: self.padding - sent]
                sent += len(piece)
                yield piece
            yield b"</v:Padding>"
        errors = "".join(
            f'<rs:RegistryError errorCode="{self.error_code}" codeContext="Document {uid} not found" '
            'severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error" location="fake"/>'
            for uid in missing
        )
        documents = "".join(
            "<DocumentResponse><RepositoryUniqueId>1.3.6.1.4.1.21367.13.80.110</RepositoryUniqueId>"
            f"<DocumentUniqueId>{uid}</DocumentUniqueId><mimeType>application/dicom</mimeType>"
            f'<Document><xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" href="cid:doc{i}%40fake"/>'
            "</Document></DocumentResponse>"
            for i, uid in enumerate(found)
        )
        yield (
            f'</s:Header><s:Body><RetrieveDocumentSetResponse xmlns="{IHE_NS}">'
            '<rs:RegistryResponse xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0" '
            f'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:{status}">'
            + (f"<rs:RegistryErrorList>{errors}</rs:RegistryErrorList>" if errors else "")
            + f"</rs:RegistryResponse>{documents}</RetrieveDocumentSetResponse></s:Body></s:Envelope>\r\n"
        ).encode()
        for i, uid in enumerate(found):
            yield (
                f"--{self.boundary}\r\nContent-ID: <doc{i}@fake>\r\nContent-Type: application/dicom\r\n"
                "Content-Transfer-Encoding: binary\r\n\r\n"
            ).encode()
            data = self.documents[uid]
            for start in range(0, len(data), 100_000):
                yield data[start : start + 100_000]
            yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode()

    def asked_series(self) -> list[list[str]]:
        """For each request received, the SeriesInstanceUIDs it held."""
        return [
            [series.get("seriesInstanceUID", "") for series in envelope.iter(f"{{{IHERAD_NS}}}SeriesRequest")]
            for envelope in self.requests
        ]
