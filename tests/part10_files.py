"""Test helper: give a bare dataset (what a C-STORE carries, PS3.7 annex C) its Part 10 file meta (PS3.10 7.1).

The library never needs this (pynetdicom's ``encoded_dataset(include_meta=True)`` builds the file meta of what C-GET
and C-MOVE receive); the tests use it to make the same instance in other transfer syntaxes.
"""

from __future__ import annotations

import zlib
from io import BytesIO

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from trolley_tasks.core import is_valid_uid
from trolley_tasks.errors import PayloadInvalidError, UsageError

PREAMBLE = b"\x00" * 128
MAGIC = b"DICM"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def is_part10(data: bytes) -> bool:
    """True when ``data`` starts like a Part 10 file: a 128-byte preamble followed by ``DICM``."""
    return len(data) >= 132 and data[128:132] == MAGIC


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
