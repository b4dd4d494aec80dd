"""An incremental ``multipart/related`` parser whose memory is one part's header plus one chunk.

WADO-RS (PS3.18 8.7.1.2) and IHE RAD-69 (MTOM/XOP) answer with ``multipart/related`` bodies (RFC 2387) that follow
the MIME multipart grammar of RFC 2046 5.1.1::

    preamble CRLF? "--" boundary padding CRLF
    headers CRLF CRLF body                     <- one part
    CRLF "--" boundary padding CRLF            <- delimiter, then the next part
    ...
    CRLF "--" boundary "--" epilogue           <- close delimiter

A WADO-RS answer for a series can weigh gigabytes and one part (a multi-frame instance) hundreds of megabytes, so
nothing here holds a whole part: :class:`MultipartReader` yields :class:`Part` objects whose body is an iterator of
chunks. When a part carries ``Content-Length`` (Orthanc sends one per part) exactly that many bytes are read and the
delimiter must follow; otherwise the body is scanned for the delimiter, keeping back only the few bytes that could be
the start of it.

A truncated answer is never a shorter list of parts: EOF before the close delimiter, a part shorter than its
``Content-Length`` or a missing delimiter raise :class:`~trolley_tasks.errors.PayloadInvalidError` from the part's
body iterator (so a consumer writing the part to a temporary file never mistakes it for a complete one) or from the
reader. dicomtrolley's parser dropped such a part silently; an export must not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from email.message import Message
from typing import Any

from trolley_tasks.errors import PayloadInvalidError

MAX_HEADER_BYTES = 64 * 1024
"""A part's header block larger than this is not a header block (RFC 2046 headers are a few lines)."""
MAX_EPILOGUE_BYTES = 64 * 1024
"""What is read after the close delimiter (RFC 2046 says the epilogue is to be ignored) before giving up on it."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``(media type, parameters)`` of a Content-Type value, quoted parameters unquoted (RFC 9110 8.3).

    >>> parse_content_type('multipart/related; type="application/dicom"; boundary=abc')
    ('multipart/related', {'type': 'application/dicom', 'boundary': 'abc'})
    """
    message = Message()
    message["Content-Type"] = value
    media_type = message.get_content_type().lower()
    params: dict[str, str] = {}
    for name, param in message.get_params(header="Content-Type", failobj=[])[1:]:
        params[name.lower()] = param if isinstance(param, str) else str(param)
    return media_type, params


def boundary_from_content_type(content_type: str | None, *, source: str | None = None, reference: Any = None) -> str:
    """The boundary of a ``multipart/*`` Content-Type, or PayloadInvalidError when the answer is not multipart."""
    media_type, params = parse_content_type(content_type or "")
    boundary = params.get("boundary", "")
    if not media_type.startswith("multipart/") or not boundary:
        raise PayloadInvalidError(
            f"expected a multipart answer with a boundary, got Content-Type {content_type!r}",
            source=source,
            reference=reference,
        )
    return boundary


class Part:
    """One body part: its headers, and its body as chunks to be read once, in order, before the next part.

    A body that is not read (or read only in part) is skipped by the reader when the next part is asked for.
    """

    def __init__(self, index: int, headers: Mapping[str, str], body: Iterator[bytes]) -> None:
        self.index = index
        self.headers = dict(headers)
        self._body = body

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def content_id(self) -> str | None:
        """``Content-ID`` without its angle brackets (RFC 2392), as ``cid:`` references name it."""
        value = self.headers.get("content-id")
        return value.strip().removeprefix("<").removesuffix(">") if value else None

    def __iter__(self) -> Iterator[bytes]:
        return self._body

    def read(self) -> bytes:
        """The whole body in memory: for small parts only (a SOAP envelope you know to be small, tests)."""
        return b"".join(self._body)

    def __repr__(self) -> str:
        return f"Part(index={self.index}, content_type={self.content_type!r}, content_id={self.content_id!r})"


class MultipartReader:
    """Iterate the parts of a ``multipart/*`` body fed as chunks of any size (1 byte to megabytes).

    Parameters
    ----------
    chunks
        The body, for example :func:`trolley_tasks.transports.http.iter_body` of a streamed response.
    boundary
        The boundary parameter of the answer's Content-Type (see :func:`boundary_from_content_type`).
    source, reference
        Carried by the errors raised, so that the engine knows which request failed.

    Examples
    --------
    >>> for part in MultipartReader(iter_body(response), boundary):
    ...     for chunk in part:
    ...         out.write(chunk)
    """

    def __init__(
        self, chunks: Iterable[bytes], boundary: str, *, source: str | None = None, reference: Any = None
    ) -> None:
        if not boundary:
            raise PayloadInvalidError("multipart boundary is empty", source=source, reference=reference)
        self._chunks = iter(chunks)
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash_boundary
        self._buffer = b""
        self._eof = False
        self._started = False
        self._failure: PayloadInvalidError | None = None
        self.epilogue_cut = False
        """True when the epilogue was longer than :data:`MAX_EPILOGUE_BYTES` and left unread."""
        self.source = source
        self.reference = reference

    # ---------------------------------------------------------------------------------------------------------------
    # Buffer handling

    def _error(self, message: str) -> PayloadInvalidError:
        self._failure = PayloadInvalidError(message, source=self.source, reference=self.reference)
        return self._failure

    def _pull(self) -> bool:
        """Append the next non-empty chunk to the buffer; False at EOF."""
        if self._eof:
            return False
        for chunk in self._chunks:
            if chunk:
                self._buffer = self._buffer + bytes(chunk) if self._buffer else bytes(chunk)
                return True
        self._eof = True
        return False

    def _ensure(self, size: int) -> bool:
        """Make the buffer at least ``size`` bytes long; False when EOF comes first."""
        while len(self._buffer) < size:
            if not self._pull():
                return False
        return True

    # ---------------------------------------------------------------------------------------------------------------
    # Grammar

    def _skip_preamble(self) -> None:
        """Discard everything up to the first dash-boundary, which starts the body or follows a CRLF."""
        if self._ensure(len(self._dash_boundary)) and self._buffer.startswith(self._dash_boundary):
            self._buffer = self._buffer[len(self._dash_boundary) :]
            return
        keep = len(self._delimiter) - 1
        while True:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                self._buffer = self._buffer[found + len(self._delimiter) :]
                return
            # Keep only what could be the start of a delimiter; the preamble itself is never held.
            if len(self._buffer) > keep:
                self._buffer = self._buffer[-keep:]
            if not self._pull():
                raise self._error("no multipart boundary in the answer (empty or not multipart)")

    def _after_boundary(self) -> bool:
        """Read what follows a boundary: True for the close delimiter ``--``, False when a part follows."""
        if not self._ensure(2):
            raise self._error("answer ends right after a boundary: no closing boundary (truncated)")
        if self._buffer.startswith(b"--"):
            self._buffer = self._buffer[2:]
            return True
        # Transport padding (RFC 2046: linear white space) before the CRLF.
        while True:
            if not self._ensure(1):
                raise self._error("answer ends inside a boundary line (truncated)")
            stripped = self._buffer.lstrip(b" \t")
            if stripped:
                self._buffer = stripped
                break
            self._buffer = b""
        if not self._ensure(2):
            raise self._error("answer ends inside a boundary line (truncated)")
        if not self._buffer.startswith(b"\r\n"):
            raise self._error("malformed multipart: a boundary is followed by neither CRLF nor '--'")
        self._buffer = self._buffer[2:]
        return False

    def _read_headers(self, index: int) -> dict[str, str]:
        if not self._ensure(2):
            raise self._error(f"answer ends before the headers of part {index + 1} (truncated)")
        if self._buffer.startswith(b"\r\n"):  # a part without headers
            self._buffer = self._buffer[2:]
            return {}
        searched = 0
        while True:
            end = self._buffer.find(b"\r\n\r\n", max(0, searched - 3))
            if end >= 0:
                break
            searched = len(self._buffer)
            if searched > MAX_HEADER_BYTES:
                raise self._error(f"headers of part {index + 1} exceed {MAX_HEADER_BYTES} bytes: not multipart")
            if not self._pull():
                raise self._error(f"answer ends inside the headers of part {index + 1} (truncated)")
        block, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        headers: dict[str, str] = {}
        last = ""
        for line in block.decode("latin-1").split("\r\n"):
            if line[:1] in (" ", "\t") and last:  # folded continuation line (RFC 5322 2.2.3)
                headers[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise self._error(f"malformed header line in part {index + 1}: {line[:80]!r}")
            last = name.strip().lower()
            headers[last] = value.strip()
        return headers

    def _body_by_length(self, index: int, length: int) -> Iterator[bytes]:
        """Exactly ``length`` bytes, then the delimiter must follow (else the Content-Length lied)."""
        remaining = length
        if self._buffer:
            take = self._buffer[:remaining]
            self._buffer = self._buffer[len(take) :]
            remaining -= len(take)
            yield take
        while remaining:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
                raise self._error(
                    f"part {index + 1} is shorter than its Content-Length ({length - remaining} of {length} bytes): "
                    "truncated answer"
                )
            if not chunk:
                continue
            chunk = bytes(chunk)
            if len(chunk) <= remaining:
                remaining -= len(chunk)
                yield chunk
            else:
                self._buffer = chunk[remaining:]
                yield chunk[:remaining]
                remaining = 0
        if not self._ensure(len(self._delimiter)):
            raise self._error(f"answer ends after part {index + 1} without a closing boundary (truncated)")
        if not self._buffer.startswith(self._delimiter):
            raise self._error(f"part {index + 1} is not followed by a boundary: its Content-Length is wrong")
        self._buffer = self._buffer[len(self._delimiter) :]

    def _body_by_scan(self, index: int) -> Iterator[bytes]:
        """Everything up to the next delimiter, holding back only what could be the delimiter's first bytes."""
        keep = len(self._delimiter) - 1
        while True:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                if found:
                    yield self._buffer[:found]
                self._buffer = self._buffer[found + len(self._delimiter) :]
                return
            if len(self._buffer) > keep:
                safe, self._buffer = self._buffer[:-keep], self._buffer[-keep:]
                yield safe
            if not self._pull():
                raise self._error(f"answer ends inside part {index + 1} without a boundary (truncated)")

    def _body(self, index: int, headers: Mapping[str, str]) -> Iterator[bytes]:
        length_text = headers.get("content-length")
        if length_text is None:
            yield from self._body_by_scan(index)
            return
        if not length_text.isdigit():
            raise self._error(f"part {index + 1} has an invalid Content-Length {length_text[:40]!r}")
        yield from self._body_by_length(index, int(length_text))

    # ---------------------------------------------------------------------------------------------------------------
    # Public iteration

    def __iter__(self) -> Iterator[Part]:
        if self._started:
            raise RuntimeError("a MultipartReader can be iterated only once")
        self._started = True
        self._skip_preamble()
        index = 0
        while True:
            if self._after_boundary():
                self._drain_epilogue()
                return
            headers = self._read_headers(index)
            body = self._body(index, headers)
            yield Part(index, headers, body)
            for _ in body:  # skip what the consumer did not read
                pass
            if self._failure is not None:  # the consumer caught a body error and asked for more
                raise self._failure
            index += 1

    def _drain_epilogue(self) -> None:
        """Read (and discard) the epilogue, so that a keep-alive connection is left clean; but at most
        :data:`MAX_EPILOGUE_BYTES`: a server that streams on after the close delimiter is not read for ever (the
        caller closes the connection instead of reusing it)."""
        drained = len(self._buffer)
        self._buffer = b""
        if drained <= MAX_EPILOGUE_BYTES:
            for chunk in self._chunks:
                drained += len(chunk)
                if drained > MAX_EPILOGUE_BYTES:
                    break
        self.epilogue_cut = drained > MAX_EPILOGUE_BYTES
        self._eof = True


def iter_parts(
    chunks: Iterable[bytes], content_type: str | None, *, source: str | None = None, reference: Any = None
) -> Iterator[Part]:
    """The parts of a multipart body, the boundary taken from the answer's ``Content-Type``."""
    boundary = boundary_from_content_type(content_type, source=source, reference=reference)
    return iter(MultipartReader(chunks, boundary, source=source, reference=reference))
