"""Identify a streamed DICOM Part 10 file from its first bytes, then hand on every byte untouched.

The HTTP downloaders receive instances as byte streams (a WADO-URI body, a WADO-RS or RAD-69 part). Before one is
handed to the engine, which writes it to disk as it comes, we must know *which* instance it is and that it is DICOM at
all: a multipart part carries no SOPInstanceUID header, and a misbehaving server may send an HTML page with status
200. :func:`peek_header` reads just enough of the stream to parse the File Meta Information (PS3.10 7.1) and the
dataset up to SeriesInstanceUID (0020,000E) -- a few kilobytes, never the pixel data -- and returns that header with
an iterator that replays the peeked bytes followed by the rest, so the file on disk stays byte-identical.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from trolley_tasks.core import InstanceReference, is_valid_uid
from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.formats import part10_scan

FIRST_PEEK = 64 * 1024
"""Bytes read before the first attempt: CT/MR headers are 1-10 KB, so one attempt nearly always suffices."""

MAX_PEEK = 16 * 1024 * 1024
"""Give up when the UIDs are not found within this many bytes: the stream is not the DICOM file it claims to be."""

_LAST_TAG_NEEDED = 0x0020000E  # SeriesInstanceUID; SOPInstanceUID (0008,0018) and StudyInstanceUID come before it
_IDENTITY_TAGS = frozenset({0x00080018, 0x0020000D, 0x0020000E})


def _stop_after_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG_NEEDED


@dataclass(frozen=True)
class Part10Header:
    """The identifying attributes of one streamed instance."""

    sop_instance_uid: str
    series_uid: str | None
    study_uid: str | None
    transfer_syntax_uid: str | None

    def reference(self, study_uid: str | None = None, series_uid: str | None = None) -> InstanceReference:
        """The InstanceReference of this file; the given UIDs are used where the file lacks them."""
        return InstanceReference(
            self.study_uid or study_uid or "", self.series_uid or series_uid or "", self.sop_instance_uid
        )


def _parse(data: bytes) -> Part10Header | None:
    """The header when ``data`` holds all of it, None when more bytes are needed. Raises on non-DICOM.

    Little endian files (nearly all) are walked by :mod:`trolley_tasks.formats.part10_scan`; big endian and deflated
    ones
    by pydicom.
    """
    try:
        found = part10_scan.scan(data, _IDENTITY_TAGS, stop=_LAST_TAG_NEEDED)
    except part10_scan.Truncated:
        return None
    except part10_scan.NotDicom as exc:
        raise InvalidDicomError(str(exc)) from exc
    except part10_scan.Unsupported:
        return _parse_pydicom(data)
    sop_uid, series_uid = found.text(0x00080018), found.text(0x0020000E)
    if sop_uid is None or series_uid is None:
        return None
    return Part10Header(sop_uid, series_uid, found.text(0x0020000D), found.transfer_syntax)


def _parse_pydicom(data: bytes) -> Part10Header | None:
    try:
        dataset = read_partial(BytesIO(data), stop_when=_stop_after_series_uid)
    except zlib.error:  # deflated syntax (PS3.5 A.5): pydicom inflates all it has, so a partial stream fails here
        return None
    sop_uid = dataset.get("SOPInstanceUID")
    series_uid = dataset.get("SeriesInstanceUID")
    if sop_uid is None or series_uid is None:
        return None
    meta = getattr(dataset, "file_meta", None)
    transfer_syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    study_uid = dataset.get("StudyInstanceUID")
    return Part10Header(
        str(sop_uid), str(series_uid), str(study_uid) if study_uid else None, str(transfer_syntax or "") or None
    )


def peek_header(
    chunks: Iterable[bytes], *, source: str | None = None, reference: Any = None
) -> tuple[Part10Header, Iterator[bytes]]:
    """Read the first bytes of a Part 10 stream; return its header and an iterator over *all* its bytes.

    Raises
    ------
    PayloadInvalidError
        The stream is not a DICOM Part 10 file (no ``DICM`` prefix: PS3.10 7.1 makes the preamble and prefix part of
        every file we store), or it lacks a valid SOPInstanceUID or SeriesInstanceUID.
    """
    source_iter = iter(chunks)
    peeked: list[bytes] = []
    size = 0
    target = FIRST_PEEK
    exhausted = False
    while True:
        while size < target and not exhausted:
            chunk = next(source_iter, None)
            if chunk is None:
                exhausted = True
            elif chunk:
                peeked.append(chunk)
                size += len(chunk)
        data = b"".join(peeked) if len(peeked) != 1 else peeked[0]
        peeked = [data] if data else []
        try:
            header = _parse(data)
        except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, OverflowError) as exc:
            raise PayloadInvalidError(
                f"not a DICOM Part 10 file ({type(exc).__name__}: {str(exc)[:120]}); first bytes {data[:40]!r}",
                source=source,
                reference=reference,
            ) from exc
        if header is not None:
            break
        if exhausted and size < part10_scan.PREAMBLE_AND_MAGIC:
            raise PayloadInvalidError(
                f"not a DICOM Part 10 file: only {size} bytes; first bytes {data[:40]!r}",
                source=source,
                reference=reference,
            )
        if exhausted or size >= MAX_PEEK:
            raise PayloadInvalidError(
                f"DICOM data without SOPInstanceUID/SeriesInstanceUID in its first {size} bytes",
                source=source,
                reference=reference,
            )
        target = min(size * 2, MAX_PEEK)
    checks = [("SOPInstanceUID", header.sop_instance_uid), ("SeriesInstanceUID", header.series_uid)]
    if header.study_uid is not None:
        checks.append(("StudyInstanceUID", header.study_uid))
    for what, uid in checks:
        if not is_valid_uid(uid):
            raise PayloadInvalidError(
                f"the file's {what} {uid!r} is not a valid UID", source=source, reference=reference
            )
    return header, itertools.chain(peeked, source_iter)


def check_identity(header: Part10Header, expected: InstanceReference, *, source: str | None = None) -> None:
    """PayloadInvalidError when the file is another instance than ``expected`` (or sits in another series)."""
    found = (header.study_uid, header.series_uid, header.sop_instance_uid)
    wanted = (expected.study_uid, expected.series_uid, expected.instance_uid)
    for what, got, want in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), found, wanted, strict=True):
        if got is not None and got != want:
            raise PayloadInvalidError(
                f"server sent {what} {got} where {want} was asked for", source=source, reference=expected
            )
