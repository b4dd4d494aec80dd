"""A fast structural walk of a DICOM Part 10 file, for the export's hot path.

Every instance an export writes is checked twice: the downloader identifies a streamed part from its first bytes,
and storage checks the whole file before it gets its final name. pydicom's reader does both correctly but costs about
a millisecond per instance in Python objects, which at hundreds of instances a second is most of a worker's CPU.
This module walks the element headers only (PS3.5 section 7: tag, VR, length), seeking over values, and keeps the
raw bytes of the few top-level elements asked for. It covers the transfer syntaxes that make up nearly all archives:
implicit VR little endian and every explicit VR little endian syntax, native or encapsulated (PS3.5 A.4). For the
rest (big endian, deflate) it answers :data:`UNSUPPORTED` and the caller uses pydicom.

It never allocates a value it was not asked for, so a file of any size is walked in constant memory (the buffer is
an ``mmap`` or the peeked bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PREAMBLE_AND_MAGIC = 132
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TRANSFER_SYNTAX = 0x00020010

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class _Short(Exception):
    """The buffer ends inside an element header or value."""


class _Malformed(Exception):
    """The bytes cannot be a dataset (an item tag where an element belongs, a length that cannot be)."""


@dataclass
class Scan:
    """What a walk found.

    Attributes
    ----------
    transfer_syntax
        The file meta TransferSyntaxUID.
    values
        ``tag -> (VR, raw value bytes)`` for the top-level elements asked for and present (VR is None for implicit VR).
    end
        Offset where the last top-level element walked ends.
    complete
        The walk reached the end of the buffer exactly at an element boundary (False when stopped early by ``stop``).
    pixel_data
        A top-level (7FE0,0010), (7FE0,0008) or (7FE0,0009) element was seen.
    implicit
        The dataset is implicit VR little endian.
    """

    transfer_syntax: str
    implicit: bool
    values: dict[int, tuple[str | None, bytes]] = field(default_factory=dict)
    end: int = 0
    complete: bool = False
    pixel_data: bool = False

    def text(self, tag: int) -> str | None:
        """A text value (UI, CS, LO, ...) without its padding, or None when absent."""
        found = self.values.get(tag)
        if found is None:
            return None
        return found[1].decode("latin-1").rstrip("\x00 ").strip()


class Unsupported(Exception):
    """The transfer syntax is one this walker does not cover; use pydicom."""


class Truncated(Exception):
    """The buffer ends inside an element: not a whole file (or, while peeking, not enough bytes yet)."""


class NotDicom(Exception):
    """The bytes are not a Part 10 file, or its structure is broken. The message says how."""


def scan(buffer: bytes | memoryview, wanted: frozenset[int] | set[int] = frozenset(), stop: int | None = None) -> Scan:
    """Walk a Part 10 file held in ``buffer`` (bytes, or a memoryview of an mmap).

    Parameters
    ----------
    wanted
        Top-level tags whose raw values to keep (as ``0xGGGGEEEE`` ints).
    stop
        Stop at the first top-level tag greater than this (the file need not be whole before it).

    Raises
    ------
    NotDicom, Truncated, Unsupported
    """
    with memoryview(buffer) as view:  # released on the way out, so the caller can close an mmap even after a raise
        return _scan(view, wanted, stop)


def _scan(view: memoryview, wanted: frozenset[int] | set[int], stop: int | None) -> Scan:
    size = len(view)
    if size < PREAMBLE_AND_MAGIC:
        raise Truncated("shorter than the 128-byte preamble and DICM prefix")
    if bytes(view[128:132]) != b"DICM":
        raise NotDicom("no DICM prefix after the 128-byte preamble (PS3.10 7.1)")
    offset = PREAMBLE_AND_MAGIC
    transfer_syntax: str | None = None
    try:
        # File meta information: group 0002, always explicit VR little endian.
        while offset + 4 <= size:
            group = _U16.unpack_from(view, offset)[0]
            if group != 0x0002:
                break
            tag, vr, length, value_at = _explicit_header(view, offset, size)
            if value_at + length > size:
                raise _Short
            if tag == _TRANSFER_SYNTAX:
                transfer_syntax = bytes(view[value_at : value_at + length]).decode("latin-1").rstrip("\x00 ")
            offset = value_at + length
    except _Short:
        raise Truncated("the file meta information is cut short") from None
    if not transfer_syntax:
        raise NotDicom("no TransferSyntaxUID in the file meta information")
    if transfer_syntax == _EXPLICIT_BE or transfer_syntax in _DEFLATED:
        raise Unsupported(transfer_syntax)
    result = Scan(transfer_syntax=transfer_syntax, implicit=transfer_syntax == _IMPLICIT_LE)
    if offset >= size:
        raise Truncated("file meta information but no dataset")
    try:
        while offset < size:
            if offset + 4 > size:
                raise _Short
            tag = (_U16.unpack_from(view, offset)[0] << 16) | _U16.unpack_from(view, offset + 2)[0]
            if stop is not None and tag > stop:
                result.end = offset
                return result
            if tag >> 16 == 0xFFFE:
                raise _Malformed(f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) at top level, offset {offset}")
            if result.implicit:
                tag, vr, length, value_at = _implicit_header(view, offset, size)
            else:
                tag, vr, length, value_at = _explicit_header(view, offset, size)
            if tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
                result.pixel_data = True
            if length == _UNDEFINED:
                nested_implicit = result.implicit or vr == "UN"  # PS3.5 6.2.2: UN of undefined length is implicit
                offset = _skip_undefined(view, value_at, size, vr == "SQ" or vr is None or vr == "UN", nested_implicit)
                continue
            end = value_at + length
            if end > size:
                raise _Short
            if tag in wanted:
                result.values[tag] = (vr, bytes(view[value_at:end]))
            offset = end
    except _Short:
        raise Truncated(f"an element starting before byte {offset} runs past the end ({size} bytes)") from None
    except _Malformed as exc:
        raise NotDicom(str(exc)) from None
    result.end = offset
    result.complete = True
    return result


def _explicit_header(view: memoryview, offset: int, size: int) -> tuple[int, str | None, int, int]:
    if offset + 8 > size:
        raise _Short
    group, element = _TAG.unpack_from(view, offset)
    tag = (group << 16) | element
    if group == 0xFFFE:  # items and delimiters carry no VR (PS3.5 7.5)
        return tag, None, _U32.unpack_from(view, offset + 4)[0], offset + 8
    vr_bytes = bytes(view[offset + 4 : offset + 6])
    if not (65 <= vr_bytes[0] <= 90 and 65 <= vr_bytes[1] <= 90):
        raise _Malformed(f"no VR at offset {offset + 4} (explicit VR expected)")
    if vr_bytes in _LONG_VRS:
        if offset + 12 > size:
            raise _Short
        return tag, vr_bytes.decode(), _U32.unpack_from(view, offset + 8)[0], offset + 12
    return tag, vr_bytes.decode(), _U16.unpack_from(view, offset + 6)[0], offset + 8


def _implicit_header(view: memoryview, offset: int, size: int) -> tuple[int, str | None, int, int]:
    if offset + 8 > size:
        raise _Short
    group, element = _TAG.unpack_from(view, offset)
    return (group << 16) | element, None, _U32.unpack_from(view, offset + 4)[0], offset + 8


def _skip_undefined(view: memoryview, offset: int, size: int, sequence: bool, implicit: bool) -> int:
    """Skip an undefined-length value: a sequence's items, or encapsulated pixel data's fragments (PS3.5 7.5, A.4).

    Returns the offset after its Sequence Delimitation Item.
    """
    while True:
        tag, _, length, value_at = _implicit_header(view, offset, size)
        if tag == _SEQ_END:
            return value_at
        if tag != _ITEM:
            raise _Malformed(f"expected an item at offset {offset}, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if length != _UNDEFINED:
            offset = value_at + length
            if offset > size:
                raise _Short
            continue
        if not sequence:
            raise _Malformed(f"a fragment of undefined length at offset {offset}")
        offset = _skip_item_dataset(view, value_at, size, implicit)


def _skip_item_dataset(view: memoryview, offset: int, size: int, implicit: bool) -> int:
    """Skip a nested dataset of undefined length; return the offset after its Item Delimitation Item."""
    while True:
        if offset + 8 > size:
            raise _Short
        group = _U16.unpack_from(view, offset)[0]
        if group == 0xFFFE:
            tag, _, _, value_at = _implicit_header(view, offset, size)
            if tag == _ITEM_END:
                return value_at
            raise _Malformed(f"unexpected item tag inside an item at offset {offset}")
        if implicit:
            _, vr, length, value_at = _implicit_header(view, offset, size)
        else:
            _, vr, length, value_at = _explicit_header(view, offset, size)
        if length == _UNDEFINED:
            offset = _skip_undefined(view, value_at, size, vr in ("SQ", "UN", None), implicit or vr == "UN")
        else:
            offset = value_at + length
            if offset > size:
                raise _Short
