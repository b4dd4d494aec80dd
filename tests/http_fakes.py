"""Local HTTP fakes for what Orthanc cannot show: broken answers, 406, and RAD-69 (no public server exists).

Every server binds 127.0.0.1 on a free port and runs in a daemon thread. The RAD-69 responder is written from the
wire facts in /work/shared/seeds/PROTOCOLS.md (IHE RAD TF-3 4.69, ITI TF-3 4.2.4.1), not from any implementation.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trolley_tasks.downloaders.rad69_soap import IHE_NS, IHERAD_NS, SOAP_NS


@dataclass
class FakeRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeResponse:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Iterable[bytes] = ()


Handler = Callable[[FakeRequest], FakeResponse]


class FakeHTTPServer:
    """Answers every request with ``handler(request)``; the body is streamed and the connection then closed."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[FakeRequest] = []
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # close-delimited bodies: a short body is a clean EOF, as a crash gives

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = FakeRequest(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length)
                )
                outer.requests.append(request)
                response = outer.handler(request)
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for chunk in response.body:
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: that is its right

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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

    def __call__(self, request: FakeRequest) -> FakeResponse:
        envelope = ET.fromstring(request.body)
        self.requests.append(envelope)
        if self.fault:
            return FakeResponse(500, {"Content-Type": "application/soap+xml; charset=utf-8"}, [self._fault()])
        asked = [element.text or "" for element in envelope.iter(f"{{{IHE_NS}}}DocumentUniqueId")]
        found = [uid for uid in asked if uid in self.documents]
        missing = [uid for uid in asked if uid not in self.documents]
        content_type = (
            f'multipart/related; type="application/xop+xml"; start="<soap@fake>"; '
            f'start-info="application/soap+xml"; boundary="{self.boundary}"'
        )
        return FakeResponse(200, {"Content-Type": content_type}, self._body(found, missing))

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
