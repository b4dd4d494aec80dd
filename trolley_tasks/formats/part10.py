"""DICOM Part 10 files: the one header reader and the one identity check of every instance we store.

An instance reaches storage in one of three shapes, and its header is walked exactly once in each:

- streamed (WADO-URI, WADO-RS, RAD-69): the downloader must read the first bytes anyway, to know which instance a
  multipart part is and that a 200 answer is DICOM at all. :func:`read_header` does that and returns a
  :class:`Part10Stream`, which carries the header *with* the chunks; the same walk
  (:class:`~trolley_tasks.formats.part10_scan.Walker`) goes on over the remaining chunks while storage writes them,
  so that at the end :meth:`Part10Stream.finish` knows whether the file is whole without reading it back;
- bytes (C-GET): wrapped in a :class:`Part10Stream` and walked as they are written;
- a file already on disk (a C-MOVE arrival in the spool): :class:`Part10File`, walked in place by
  :func:`read_part10_header` and then renamed into the output.

:func:`check_identity` is the one comparison between a header and the reference that was asked for.

The walk covers the little endian syntaxes that make up nearly all archives (PS3.5 A.2-A.4); big endian and
deflated files are read by pydicom (:mod:`~trolley_tasks.formats.part10_pydicom`), from the written file: the rare
case in which a stream's header is read twice.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword

from trolley_tasks.core import InstanceReference, is_valid_uid
from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.formats import part10_scan
from trolley_tasks.formats.part10_pydicom import peek_pydicom, read_part10_pydicom

FIRST_PEEK = 64 * 1024
"""Bytes read before the identity is first looked for: CT/MR headers are 1-10 KB."""

MAX_PEEK = 16 * 1024 * 1024
"""Give up when the UIDs are not found within this many bytes: the stream is not the DICOM file it claims to be."""

_SOP, _STUDY, _SERIES, _ROWS = 0x00080018, 0x0020000D, 0x0020000E, 0x00280010
_BULK_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
_INT_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}


class Part10Header:
    """The top-level attributes read from one file's header: DICOM keyword -> value.

    Text values (UI, CS, LO, PN, DA, ...) are ``str`` without padding, binary integers (US, UL, SS, SL) are ``int``;
    values are decoded when asked for. It answers ``get``, ``in`` and attribute access like a pydicom Dataset, for
    the attributes it holds (every top-level value up to :data:`~trolley_tasks.formats.part10_scan.KEEP_SIZE`
    bytes, and the TransferSyntaxUID).
    """

    def __init__(self, transfer_syntax_uid: str | None, raw: dict[int, tuple[str | None, bytes]]) -> None:
        self.transfer_syntax_uid = transfer_syntax_uid
        self._raw = raw
        self._decoded: dict[str, object] = {}

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> Part10Header:
        """The header of a dataset pydicom has read (big endian and deflated files, or a whole parsed instance)."""
        meta = getattr(dataset, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        header = cls(str(syntax) if syntax else None, {})
        for element in dataset:  # bulk values (pixel data, OB/OW...) stay unread: pydicom defers them
            if element.VR not in _BULK_VRS and not element.tag.is_private and element.value is not None:
                value = element.value
                header._decoded[element.keyword] = value if isinstance(value, int) else str(value)
        return header

    @property
    def sop_instance_uid(self) -> str | None:
        return _text(self.get("SOPInstanceUID"))

    @property
    def study_uid(self) -> str | None:
        return _text(self.get("StudyInstanceUID"))

    @property
    def series_uid(self) -> str | None:
        return _text(self.get("SeriesInstanceUID"))

    def reference(self, study_uid: str | None = None, series_uid: str | None = None) -> InstanceReference:
        """The InstanceReference of this file; the given UIDs are used where the file lacks them."""
        return InstanceReference(
            self.study_uid or study_uid or "", self.series_uid or series_uid or "", self.sop_instance_uid or ""
        )

    def get(self, keyword: str, default: object = None) -> object:
        if keyword == "TransferSyntaxUID":
            return self.transfer_syntax_uid if self.transfer_syntax_uid is not None else default
        if keyword in self._decoded:
            return self._decoded[keyword]
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in self._raw:
            return default
        value = self._decoded[keyword] = _decode(tag, *self._raw[tag])
        return value

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and self.get(keyword) is not None

    def __getattr__(self, keyword: str) -> object:
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        value = self.get(keyword)
        if value is None:
            raise AttributeError(keyword)
        return value

    def __repr__(self) -> str:
        return f"Part10Header(sop={self.sop_instance_uid!r}, syntax={self.transfer_syntax_uid!r})"


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _decode(tag: int, vr: str | None, raw: bytes) -> object:
    """A raw little endian value as text or int; the VR comes from the dictionary for implicit VR files."""
    vr = vr or (dictionary_VR(tag) if dictionary_has_tag(tag) else "UN")
    if vr in _INT_FORMATS and len(raw) >= struct.calcsize(_INT_FORMATS[vr]):
        return int(struct.unpack_from(_INT_FORMATS[vr], raw)[0])
    return raw.decode("latin-1").rstrip("\x00 ").strip()


def check_identity(header: Part10Header, expected: InstanceReference, *, source: str | None = None) -> None:
    """Raise PayloadInvalidError unless ``header`` is the instance ``expected``, in its series and study.

    The three UIDs are type 1 in every composite IOD (PS3.3 C.7.2.1, C.7.3.1, C.12.1), so a header without one of
    them is a cut or broken file, and one with another value is another instance than the one asked for (a server
    that mixed up a request, or a multipart part from another series).
    """
    found = (header.study_uid, header.series_uid, header.sop_instance_uid)
    wanted = (expected.study_uid, expected.series_uid, expected.instance_uid)
    for what, got, want in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), found, wanted, strict=True):
        if got is None:
            raise PayloadInvalidError(
                f"file has no {what}: not a whole composite instance (truncated?)", source=source, reference=expected
            )
        if got != want:
            raise PayloadInvalidError(
                f"server sent {what} {got[:80]!r} where {want} was asked for", source=source, reference=expected
            )


def _header_or_invalid(read: Callable[[bytes], Dataset | None], data: bytes, **context: Any) -> Part10Header | None:
    """The header pydicom reads from the first bytes, or PayloadInvalidError naming the source."""
    try:
        dataset = read(data)
    except PayloadInvalidError as exc:
        raise _invalid(exc.message, **context) from exc
    return Part10Header.from_dataset(dataset) if dataset is not None else None


def _invalid(message: str, exc: BaseException | None = None, **context: Any) -> PayloadInvalidError:
    detail = f" ({type(exc).__name__}: {str(exc)[:120]})" if exc is not None else ""
    return PayloadInvalidError(f"{message}{detail}", **context)


RawPayload = bytes | Iterator[bytes]
"""One instance's DICOM Part 10 bytes: whole, or chunks to be consumed in order. The iterators the downloaders yield
are a :class:`Part10Stream` (its header travels with the chunks) or a
:class:`Part10File` (a file to be moved); pass them on as they are."""


class Part10Stream(Iterator[bytes]):
    """One instance's Part 10 bytes on their way to disk, with the header read from them as they pass.

    It is an iterator of chunks, so any code that takes ``Iterator[bytes]`` takes it. Iterate it once to get every
    byte unchanged (the peeked ones first); then :meth:`finish` gives the whole header or says why the bytes are not
    a whole Part 10 file. The walk never raises while the bytes pass, so that a payload that is not DICOM is still
    written whole, to quarantine.

    Attributes
    ----------
    header
        The identifying header, known before the first chunk is handed on when the stream came from
        :func:`read_header`; None for a stream wrapped around plain bytes or chunks until :meth:`finish`.
    """

    def __init__(self, chunks: Iterable[bytes], *, source: str | None = None, reference: Any = None) -> None:
        self.header: Part10Header | None = None
        self.source = source
        self.reference = reference
        self._walker = part10_scan.Walker()
        self._rest = iter(chunks)
        self._peeked: list[bytes] = []
        self._sinks: list[Callable[[bytes], object]] = []
        self._chunks: Iterator[bytes] | None = None
        self._ended = False

    @classmethod
    def of(cls, payload: bytes | bytearray | memoryview | Iterable[bytes] | Part10Stream) -> Part10Stream:
        """``payload`` as a stream: a stream passes through, bytes or chunks are wrapped (walked as written)."""
        if isinstance(payload, Part10Stream):
            return payload
        if isinstance(payload, bytes | bytearray | memoryview):
            return cls((bytes(payload),))
        return cls(payload)

    def tee(self, sink: Callable[[bytes], object]) -> Part10Stream:
        """Also hand every chunk to ``sink`` as it passes (the engine keeps a broken stream's chunks for
        quarantine). Returns this stream."""
        self._sinks.append(sink)
        return self

    def __iter__(self) -> Part10Stream:
        return self

    def __next__(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._pass_on()
        return next(self._chunks)

    def _pass_on(self) -> Iterator[bytes]:
        for chunk in itertools.chain(self._peeked, self._fed(self._rest)):
            for sink in self._sinks:
                sink(chunk)
            yield chunk
        self._peeked = []
        self._ended = True

    def _fed(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if chunk:
                self._walker.feed(chunk)
                yield chunk

    def _peek(self) -> None:
        """Read chunks until the walk is past SeriesInstanceUID, the stream ends, or :data:`MAX_PEEK` is reached."""
        target = FIRST_PEEK
        walker = self._walker
        while True:
            for chunk in self._rest:
                if chunk:
                    walker.feed(chunk)
                    self._peeked.append(chunk)
                    if walker.size >= target or walker.passed(_SERIES):
                        break
            else:
                return
            if walker.passed(_SERIES) or walker.size >= MAX_PEEK:
                return
            target = min(walker.size * 2, MAX_PEEK)

    def finish(self, written: Path | None = None) -> Part10Header:
        """The header of the whole file, once every chunk was handed on.

        Parameters
        ----------
        written
            Where the bytes were written: big endian and deflated files (which the streamed walk does not cover)
            are read back from there by pydicom.

        Raises
        ------
        PayloadInvalidError
            Not a Part 10 file, not whole (cut inside an element, or an image without its pixel data), or a big
            endian / deflated stream with no ``written`` file to read.
        """
        if not self._ended:
            raise RuntimeError("Part10Stream.finish() before every chunk was handed on")
        context = {"source": self.source, "reference": self.reference}
        walker = self._walker
        try:
            found = walker.finish()
        except part10_scan.Unsupported as exc:
            if written is None:
                message = "a big endian or deflated stream needs its written file to be checked"
                raise _invalid(message, **context) from exc
            return read_part10_header(written)
        except part10_scan.Truncated as exc:
            if walker.size < part10_scan.PREAMBLE_AND_MAGIC:
                raise _invalid(f"not a DICOM Part 10 file: only {walker.size} bytes", **context) from exc
            raise _invalid(f"DICOM file is truncated: {exc}", **context) from exc
        except part10_scan.NotDicom as exc:
            raise _invalid(f"not a DICOM Part 10 file: {exc}", **context) from exc
        return _whole(found, **context)


def _whole(found: part10_scan.Scan, **context: Any) -> Part10Header:
    """The header of a complete walk; a cut exactly between two elements leaves a well-formed but shorter file, and
    for images the pixel data is the last and biggest element, so an image description (Rows) without any pixel
    data element is such a cut."""
    if _ROWS in found.values and not found.pixel_data:
        raise _invalid("DICOM file is truncated: it describes an image (Rows) but holds no pixel data", **context)
    return Part10Header(found.transfer_syntax, found.values)


def read_header(chunks: Iterable[bytes], *, source: str | None = None, reference: Any = None) -> Part10Stream:
    """Read the first bytes of a Part 10 stream, up to SeriesInstanceUID; return it with its ``header`` set.

    Only a few kilobytes are read (the File Meta Information, PS3.10 7.1, and the dataset up to (0020,000E)); the
    returned stream hands on every byte unchanged, so the file on disk stays byte-identical.

    Raises
    ------
    PayloadInvalidError
        The stream is not a DICOM Part 10 file (no ``DICM`` prefix: PS3.10 7.1 makes the preamble and prefix part
        of every file we store), or it lacks a valid SOPInstanceUID or SeriesInstanceUID in its first bytes.
    """
    stream = Part10Stream(chunks, source=source, reference=reference)
    stream._peek()
    walker = stream._walker
    context = {"source": source, "reference": reference}
    data = b"".join(stream._peeked[:1])[:40]
    if walker.error is not None:
        raise _invalid(f"not a DICOM Part 10 file: {walker.error}; first bytes {data!r}", **context)
    if walker.size < part10_scan.PREAMBLE_AND_MAGIC:
        raise _invalid(f"not a DICOM Part 10 file: only {walker.size} bytes; first bytes {data!r}", **context)
    if walker.unsupported is not None:
        header = _header_or_invalid(peek_pydicom, b"".join(stream._peeked), **context)
    else:
        found = walker.found
        header = Part10Header(found.transfer_syntax, dict(found.values)) if found is not None else None
    if header is None or header.sop_instance_uid is None or header.series_uid is None:
        raise _invalid(
            f"DICOM data without SOPInstanceUID/SeriesInstanceUID in its first {walker.size} bytes", **context
        )
    for what, uid in (("SOPInstanceUID", header.sop_instance_uid), ("SeriesInstanceUID", header.series_uid)):
        if not is_valid_uid(uid):
            raise _invalid(f"the file's {what} {uid!r} is not a valid UID", **context)
    if header.study_uid is not None and not is_valid_uid(header.study_uid):
        raise _invalid(f"the file's StudyInstanceUID {header.study_uid!r} is not a valid UID", **context)
    stream.header = header
    return stream


class Part10File(Iterator[bytes]):
    """A Part 10 file already on disk (a C-MOVE arrival claimed from the spool), handed to storage to be checked in
    place and renamed into the output: its bytes are never read into memory.

    It is also an iterator of chunks, for a caller that copies instead of renaming: it reads the file and removes it
    once read, so that a copied arrival does not stay behind in the spool.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._chunks: Iterator[bytes] | None = None

    def __repr__(self) -> str:
        return f"Part10File({str(self.path)!r})"

    def __next__(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._read()
        return next(self._chunks)

    def _read(self) -> Iterator[bytes]:
        with open(self.path, "rb") as handle:
            yield from iter(lambda: handle.read(4 * part10_scan.FEED_SIZE), b"")
        self.path.unlink(missing_ok=True)


def read_part10_header(path: Path | str) -> Part10Header:
    """Read the Part 10 file at ``path`` without loading large values, and check that it is whole.

    The whole element structure is walked (:func:`~trolley_tasks.formats.part10_scan.scan` over an mmap), values are
    seeked over, so memory stays small whatever the file size. Big endian and deflated files are read by pydicom.

    Raises
    ------
    PayloadInvalidError
        Not Part 10 (no preamble and ``DICM``, no TransferSyntaxUID), or not whole (see :meth:`Part10Stream.finish`).
    """
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                raise PayloadInvalidError("not a DICOM Part 10 file: the file is empty")
            with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                found = part10_scan.scan(view)
    except part10_scan.Unsupported:
        return Part10Header.from_dataset(read_part10_pydicom(path))
    except part10_scan.Truncated as exc:
        if size < part10_scan.PREAMBLE_AND_MAGIC:
            raise PayloadInvalidError(f"not a DICOM Part 10 file: only {size} bytes") from exc
        raise PayloadInvalidError(f"DICOM file is truncated: {exc}") from exc
    except part10_scan.NotDicom as exc:
        raise PayloadInvalidError(f"not a DICOM Part 10 file: {exc}") from exc
    return _whole(found)


def dataset_value(dataset: Dataset, keyword: str) -> object:
    """The value of ``keyword`` in ``dataset``, looking in its file meta for group 0002 keywords."""
    tag = tag_for_keyword(keyword)
    source = dataset.get("file_meta") if tag is not None and tag >> 16 == 0x0002 else dataset
    return source.get(keyword) if source is not None else None
