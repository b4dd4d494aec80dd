"""DICOM Part 10 files: checking one on disk without decoding pixels, and giving a bare dataset its file meta.

Storage uses :func:`read_part10_header` to check every file it is about to commit, and the DIMSE receivers use
:func:`add_file_meta` to turn what C-GET / C-MOVE hand over (a bare dataset in the negotiated transfer syntax,
PS3.7 annex C) into a Part 10 file (PS3.10 section 7.1: a 128-byte preamble, ``DICM``, then the File Meta
Information group 0002 in explicit VR little endian).
"""

from __future__ import annotations

import os
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from trolley_tasks.core import is_valid_uid
from trolley_tasks.errors import PayloadInvalidError, UsageError

PREAMBLE = b"\x00" * 128
MAGIC = b"DICM"

DEFER_SIZE = 64 * 1024
"""Values larger than this are skipped (seeked over), not read: pixel data never enters memory while checking."""

_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData


def is_part10(data: bytes) -> bool:
    """True when ``data`` starts like a Part 10 file: a 128-byte preamble followed by ``DICM``."""
    return len(data) >= 132 and data[128:132] == MAGIC


def read_part10_header(path: Path | str) -> Dataset:
    """Parse the Part 10 file at ``path`` without loading large values, and check that it is whole.

    The whole element structure is walked, but values longer than :data:`DEFER_SIZE` (pixel data, big private
    blobs) are seeked over, so memory stays small whatever the file size. A file that is not Part 10 (no preamble
    and ``DICM``, no TransferSyntaxUID) or whose last element runs past the end of the file (a truncated download)
    raises :class:`PayloadInvalidError`.

    Returns
    -------
    Dataset
        The dataset with ``file_meta``; deferred values are read from ``path`` only if someone asks for them.
    """
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
