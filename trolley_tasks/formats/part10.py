"""DICOM Part 10 files: checking one on disk without decoding pixels, and giving a bare dataset its file meta.

Storage uses :func:`read_part10_header` to check every file it is about to commit, and the DIMSE receivers use
:func:`add_file_meta` to turn what C-GET / C-MOVE hand over (a bare dataset in the negotiated transfer syntax,
PS3.7 annex C) into a Part 10 file (PS3.10 section 7.1: a 128-byte preamble, ``DICM``, then the File Meta
Information group 0002 in explicit VR little endian).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from trolley_tasks.core import is_valid_uid
from trolley_tasks.errors import PayloadInvalidError, UsageError
from trolley_tasks.formats import part10_scan

PREAMBLE = b"\x00" * 128
MAGIC = b"DICM"

DEFER_SIZE = 64 * 1024
"""Values larger than this are skipped (seeked over), not read: pixel data never enters memory while checking."""

_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows")
_INT_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}


def is_part10(data: bytes) -> bool:
    """True when ``data`` starts like a Part 10 file: a 128-byte preamble followed by ``DICM``."""
    return len(data) >= 132 and data[128:132] == MAGIC


class FileHeader:
    """The attributes :func:`read_part10_header` read from a file: DICOM keyword -> value.

    Text values (UI, CS, LO, PN, DA, ...) are ``str`` without padding, binary integers (US, UL, SS, SL) are ``int``.
    It answers ``get``, ``in`` and attribute access like a pydicom Dataset, for the few attributes it holds.
    """

    def __init__(self, values: dict[str, object]) -> None:
        self._values = values

    def get(self, keyword: str, default: object = None) -> object:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values

    def __getattr__(self, keyword: str) -> object:
        try:
            return self.__dict__["_values"][keyword]
        except KeyError:
            raise AttributeError(keyword) from None

    def __repr__(self) -> str:
        return f"FileHeader({self._values!r})"


def read_part10_header(path: Path | str, keywords: Iterable[str] = ()) -> FileHeader:
    """Read the Part 10 file at ``path`` without loading large values, and check that it is whole.

    The whole element structure is walked, but values are seeked over, so memory stays small whatever the file
    size. A file that is not Part 10 (no preamble and ``DICM``, no TransferSyntaxUID) or whose last element runs past
    the end of the file (a truncated download) raises :class:`PayloadInvalidError`.

    Parameters
    ----------
    keywords
        Top-level attributes the caller needs besides the identifying ones (SOPClassUID, SOPInstanceUID,
        StudyInstanceUID, SeriesInstanceUID, Rows) and the TransferSyntaxUID, for example a path template's.

    Little endian files (nearly all) are walked by :mod:`trolley_tasks.formats.part10_scan` at a fraction of pydicom's
    cost;
    big endian and deflated files by pydicom (:func:`_read_part10_header_pydicom`).
    """
    wanted = {int(tag): keyword for keyword in (*_IDENTITY_KEYWORDS, *keywords) if (tag := tag_for_keyword(keyword))}
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                raise PayloadInvalidError("not a DICOM Part 10 file: the file is empty")
            with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                found = part10_scan.scan(view, frozenset(wanted))
    except part10_scan.Unsupported:
        dataset = _read_part10_header_pydicom(path)
        values = {kw: _plain(v) for kw in wanted.values() if (v := dataset_value(dataset, kw)) is not None}
        values["TransferSyntaxUID"] = str(dataset.file_meta.TransferSyntaxUID)
        return FileHeader(values)
    except part10_scan.Truncated as exc:
        if size < part10_scan.PREAMBLE_AND_MAGIC:
            raise PayloadInvalidError(f"not a DICOM Part 10 file: only {size} bytes") from exc
        raise PayloadInvalidError(f"DICOM file is truncated: {exc}") from exc
    except part10_scan.NotDicom as exc:
        raise PayloadInvalidError(f"not a DICOM Part 10 file: {exc}") from exc
    if 0x00280010 in found.values and not found.pixel_data:
        raise PayloadInvalidError("DICOM file is truncated: it describes an image (Rows) but holds no pixel data")
    values = {wanted[tag]: _decode(tag, vr, raw) for tag, (vr, raw) in found.values.items()}
    values["TransferSyntaxUID"] = found.transfer_syntax
    return FileHeader(values)


def _decode(tag: int, vr: str | None, raw: bytes) -> object:
    """A raw little endian value as text or int; the VR comes from the dictionary for implicit VR files."""
    vr = vr or (dictionary_VR(tag) if dictionary_has_tag(tag) else "UN")
    if vr in _INT_FORMATS and len(raw) >= struct.calcsize(_INT_FORMATS[vr]):
        return int(struct.unpack_from(_INT_FORMATS[vr], raw)[0])
    return raw.decode("latin-1").rstrip("\x00 ").strip()


def _plain(value: object) -> object:
    return value if isinstance(value, int) else str(value)


def dataset_value(dataset: Dataset, keyword: str) -> object:
    """The value of ``keyword`` in ``dataset``, looking in its file meta for group 0002 keywords."""
    tag = tag_for_keyword(keyword)
    source = dataset.get("file_meta") if tag is not None and tag >> 16 == 0x0002 else dataset
    return source.get(keyword) if source is not None else None


def _read_part10_header_pydicom(path: Path | str) -> Dataset:
    """:func:`read_part10_header` for the transfer syntaxes the fast walk does not cover (big endian, deflate)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fp:
            dataset = pydicom.dcmread(fp, defer_size=DEFER_SIZE, force=False)
            end = fp.tell()
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError, OverflowError, zlib.error) as exc:
        raise PayloadInvalidError(f"not a DICOM Part 10 file: {exc}") from exc
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise PayloadInvalidError("not a DICOM Part 10 file: no TransferSyntaxUID in the file meta information")
    if not dataset:
        raise PayloadInvalidError("DICOM file holds file meta information but no dataset (truncated)")
    # pydicom stops quietly at a short read, so the structure itself must account for every byte: the last
    # top-level element must end exactly at the end of the file (a value or an element header cut short is a
    # truncated download; PS3.10 files have nothing after their last element).
    # (A deflated dataset is parsed from an inflated copy, so its offsets say nothing about the file; zlib's own
    # stream end check stands in for this one.)
    deflated = meta.TransferSyntaxUID == _DEFLATED
    if deflated:
        end = size
    last = dataset.get_item(max(dataset.keys()))
    value_tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)  # a RawDataElement's; parsed sequences have neither
    if not deflated and value_tell is not None and length is not None and length != 0xFFFFFFFF:
        end = value_tell + length
        if end < size:
            raise PayloadInvalidError(
                f"DICOM file is truncated: {size - end} stray bytes after its last element (a cut element header)"
            )
    if end > size:
        raise PayloadInvalidError(f"DICOM file is truncated: its last element ends at byte {end}, the file has {size}")
    # A cut exactly between two elements leaves a well-formed but shorter file. For images the pixel data is the
    # last and biggest element, so an image description (Rows) without any pixel data element is such a cut.
    if "Rows" in dataset and not any(tag in dataset for tag in _PIXEL_DATA_TAGS):
        raise PayloadInvalidError("DICOM file is truncated: it describes an image (Rows) but holds no pixel data")
    return dataset


def add_file_meta(data: bytes, transfer_syntax_uid: str) -> bytes:
    """Return ``data`` as a Part 10 file: the preamble, ``DICM`` and File Meta Information, then ``data`` unchanged.

    C-STORE sub-operations (from a C-GET or a C-MOVE) carry a bare dataset encoded in the presentation context's
    transfer syntax; there is no file meta on the wire (PS3.7 annex C). The file meta is built from the dataset's own
    SOPClassUID and SOPInstanceUID (PS3.10 7.1) and the ``transfer_syntax_uid`` the caller negotiated. The dataset
    bytes are kept exactly as received. ``data`` that is already Part 10 is returned as is.

    Raises
    ------
    UsageError
        ``transfer_syntax_uid`` is not a UID.
    PayloadInvalidError
        ``data`` cannot be read in that transfer syntax, or lacks a valid SOPClassUID / SOPInstanceUID.
    """
    if is_part10(data):
        return data
    if not is_valid_uid(transfer_syntax_uid):
        raise UsageError(f"transfer syntax {transfer_syntax_uid!r} is not a UID")
    syntax = UID(transfer_syntax_uid)
    body = data
    if syntax == _DEFLATED:
        try:
            body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 1 << 20)
        except zlib.error as exc:
            raise PayloadInvalidError(f"deflated dataset does not inflate: {exc}") from exc
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    try:
        head = read_dataset(BytesIO(body), implicit, little, stop_when=lambda tag, vr, length: tag > 0x00080018)
        sop_class = head.get("SOPClassUID")
        sop_instance = head.get("SOPInstanceUID")
    except (EOFError, ValueError, KeyError, NotImplementedError, OverflowError) as exc:
        raise PayloadInvalidError(f"dataset cannot be read as {transfer_syntax_uid}: {exc}") from exc
    if not is_valid_uid(sop_class) or not is_valid_uid(sop_instance):
        raise PayloadInvalidError(
            f"dataset has no valid SOPClassUID/SOPInstanceUID ({sop_class!r}, {sop_instance!r}); cannot build file meta"
        )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(sop_class))
    meta.MediaStorageSOPInstanceUID = UID(str(sop_instance))
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    out = BytesIO()
    out.write(PREAMBLE)
    out.write(MAGIC)
    out.write(buffer.getvalue())
    out.write(data)
    return out.getvalue()
