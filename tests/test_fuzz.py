"""Property tests: hostile bytes into every parser of server answers and user files; nothing but the TrolleyError
tree may escape (an escaped KeyError or UnicodeDecodeError would crash a worker instead of failing one instance).

Each property runs :data:`tests.conftest.FUZZ_EXAMPLES` examples (2,000 by default, the ``trolley`` hypothesis
profile) and three times more under the ``slow`` marker. Inputs are built near the valid grammar (then cut, chunked
and mutated), since pure noise rarely gets past the first check of a parser.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.conftest import FUZZ_EXAMPLES
from trolley_tasks.cohort import iter_csv_rows
from trolley_tasks.core import InstanceReference, QueryLevels
from trolley_tasks.deid import BUILT_IN, Deidentifier, ExcludedByProfile
from trolley_tasks.downloaders.rad69_soap import IHE_NS, read_answer
from trolley_tasks.errors import TrolleyError
from trolley_tasks.formats.dicom_json import datasets_from_json
from trolley_tasks.formats.multipart import MultipartReader
from trolley_tasks.formats.part10 import check_identity, read_header, read_part10_header
from trolley_tasks.searchers.mint import parse_mint_xml

SLOW_EXAMPLES = FUZZ_EXAMPLES * 3  # CI runs the slow tests too: about 2 minutes in all
_WORK_FOLDER = tempfile.TemporaryDirectory(prefix="trolley-fuzz-")  # removed when the test process ends
_WORK = Path(_WORK_FOLDER.name)


def only_our_errors(call: Callable[[], Any]) -> None:
    with contextlib.suppress(TrolleyError):
        call()


def chunked(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``data`` cut at ``sizes`` (cycled), as a network would."""
    offset, index = 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)] if sizes else len(data)
        yield data[offset : offset + size]
        offset += size
        index += 1


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid-looking document, then cut, with bytes flipped or inserted."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        where = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip":
            data[where] = draw(st.integers(0, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(max_size=16))
        elif action == "delete":
            del data[where : where + draw(st.integers(1, 8))]
        else:
            del data[where:]
    return bytes(data)


SIZES = st.lists(st.integers(1, 97), max_size=6)

# ------------------------------------------------------------------------------------------------- multipart

BCHARS = st.text(alphabet="abcXYZ0129'()+_,-./:=? ", min_size=1, max_size=20).map(str.strip).filter(bool)
HEADER_LINE = st.sampled_from(
    [
        b"Content-Type: application/dicom",
        b"Content-Length: 3",
        b"Content-Length: 99999",
        b"Content-Length: -1",
        b"Content-Length: x",
        b"Content-ID: <a@b>",
        b"X: \xff\xfe",
        b" folded",
        b"nocolon",
        b":",
    ]
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(BCHARS)
    parts = draw(st.lists(st.tuples(st.lists(HEADER_LINE, max_size=3), st.binary(max_size=64)), max_size=4))
    body = draw(st.binary(max_size=16))
    for headers, content in parts:
        body += b"\r\n--" + boundary.encode() + draw(st.sampled_from([b"", b" \t"])) + b"\r\n"
        body += b"".join(line + b"\r\n" for line in headers) + b"\r\n" + content
    body += b"\r\n--" + boundary.encode() + b"--" + draw(st.binary(max_size=16))
    return boundary, body


def consume_multipart(boundary: str, body: bytes, sizes: list[int]) -> None:
    for part in MultipartReader(chunked(body, sizes), boundary):
        assert isinstance(part.headers, dict)
        for chunk in part:
            assert isinstance(chunk, bytes)


def multipart_property(case: tuple[str, bytes], raw: bytes, sizes: list[int]) -> None:
    boundary, body = case
    only_our_errors(lambda: consume_multipart(boundary, body, sizes))
    only_our_errors(lambda: consume_multipart(boundary, raw, sizes))


# --------------------------------------------------------------------------------------------- QIDO JSON

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
ANY_JSON = st.recursive(
    JSON_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
TAGS = st.sampled_from(["0020000D", "0020000E", "00080018", "00100010", "00081190", "7FE00010", "zz", "0008"])
VRS = st.sampled_from(["UI", "PN", "SQ", "DA", "IS", "DS", "OB", "US", "AT", "XX", ""])
ELEMENT = st.fixed_dictionaries(
    {"vr": VRS},
    optional={
        "Value": st.lists(ANY_JSON, max_size=3),
        "BulkDataURI": st.text(max_size=8),
        "InlineBinary": st.text(max_size=8),
    },
)
DICOM_JSON = st.lists(st.dictionaries(TAGS, ELEMENT | ANY_JSON, max_size=5), max_size=3)


def json_property(document: Any, raw: bytes) -> None:
    text = json.dumps(document).encode()
    only_our_errors(lambda: datasets_from_json(text))
    only_our_errors(lambda: datasets_from_json(raw))


# ----------------------------------------------------------------------------------------------- MINT XML

MINT_ATTR = st.builds(
    lambda tag, vr, val: f'<attr tag="{tag}" vr="{vr}" val="{val}"/>',
    st.sampled_from(["0020000d", "0020000e", "00080018", "00100020", "00201208", "zz", ""]),
    st.sampled_from(["UI", "LO", "IS", "SQ", "", "XX"]),
    st.sampled_from(["1.2.3", "1.2.3.4", "", "&amp;", "x" * 70, "1..2", "-1"]),
)


@st.composite
def mint_documents(draw: st.DrawFn) -> bytes:
    def element(name: str, children: list[str]) -> str:
        return f"<{name}>" + "".join(draw(st.lists(MINT_ATTR, max_size=3))) + "".join(children) + f"</{name}>"

    instances = [element("instance", []) for _ in range(draw(st.integers(0, 2)))]
    series = [element("series", [element("instances", instances)]) for _ in range(draw(st.integers(0, 2)))]
    studies = [element("study", series) for _ in range(draw(st.integers(0, 2)))]
    doc = '<studySearchResults xmlns="http://medical.nema.org/mint">' + "".join(studies) + "</studySearchResults>"
    return (
        draw(st.sampled_from(["", '<?xml version="1.0"?>', "<!DOCTYPE x [<!ENTITY a 'b'>]>"])).encode() + doc.encode()
    )


def mint_property(document: bytes, level: QueryLevels, sizes: list[int]) -> None:
    only_our_errors(lambda: parse_mint_xml(list(chunked(document, sizes)), level))


# ------------------------------------------------------------------------------------------------ RAD-69

RAD69_PIECE = st.sampled_from(
    [
        '<rs:RegistryResponse xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0" status="x:Success"/>',
        '<rs:RegistryErrorList xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"><rs:RegistryError '
        'errorCode="XDSMissingDocument" codeContext="1.2.3" location="x"/></rs:RegistryErrorList>',
        "<DocumentResponse><DocumentUniqueId>1.2.3</DocumentUniqueId><mimeType>application/dicom</mimeType>"
        '<Document><Include xmlns="http://www.w3.org/2004/08/xop/include" href="cid:a%40b"/></Document>'
        "</DocumentResponse>",
        "<DocumentResponse><DocumentUniqueId></DocumentUniqueId><Document>AAAA</Document></DocumentResponse>",
        '<s:Fault xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Reason><s:Text>no</s:Text></s:Reason></s:Fault>',
        '<Include xmlns="http://www.w3.org/2004/08/xop/include" href="%%%"/>',
    ]
)


@st.composite
def rad69_documents(draw: st.DrawFn) -> bytes:
    pieces = "".join(draw(st.lists(RAD69_PIECE, max_size=5)))
    return (
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
        f'<RetrieveDocumentSetResponse xmlns="{IHE_NS}">{pieces}</RetrieveDocumentSetResponse></s:Body></s:Envelope>'
    ).encode()


def rad69_property(document: bytes, sizes: list[int]) -> None:
    only_our_errors(lambda: read_answer(chunked(document, sizes)))


# --------------------------------------------------------------------------------------------- Part 10

REF = InstanceReference("1.2.3", "1.2.3.4", "1.2.3.4.5")


def _part10(syntax: str, pixels: bytes) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = REF.instance_uid
    ds.StudyInstanceUID = REF.study_uid
    ds.SeriesInstanceUID = REF.series_uid
    ds.Rows = 2
    ds.add_new(0x00081115, "SQ", [Dataset()])
    ds.add_new(0x7FE00010, "OB", pixels)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


PART10 = st.builds(_part10, st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]), st.binary(max_size=32))


def walk_part10(data: bytes, sizes: list[int]) -> None:
    stream = read_header(chunked(data, sizes))
    for _ in stream:
        pass
    check_identity(stream.finish(), REF)


def part10_property(data: bytes, sizes: list[int]) -> None:
    only_our_errors(lambda: walk_part10(data, sizes))
    path = _WORK / "part10.dcm"
    path.write_bytes(data)
    only_our_errors(lambda: check_identity(read_part10_header(path), REF))


# ------------------------------------------------------------------------------------- de-identification

_FUZZ_KEY = b"a key for the fuzz test, long enough"
_EVERYTHING = BUILT_IN["basic"].model_copy(update={"exclude_burned_in": False, "exclude_sop_classes": []})
BY_SPANS = Deidentifier(_EVERYTHING, _FUZZ_KEY)
BY_PYDICOM = Deidentifier(_EVERYTHING.model_copy(update={"safe_private": ["NO SUCH CREATOR:0009,xx01"]}), _FUZZ_KEY)
"""The same profile; a safe-private list that keeps nothing sends every header through pydicom's reader."""


def _identified(syntax: str, pixels: bytes, undefined: bool) -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = REF.instance_uid
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "ACC1"
    ds.StudyDescription = "THORAX ÉTUDE DOE"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PID1"
    ds.StudyInstanceUID = REF.study_uid
    ds.SeriesInstanceUID = REF.series_uid
    item = Dataset()
    item.ReferencedSOPInstanceUID = REF.instance_uid
    ds.add_new(0x00081140, "SQ", [item])  # ReferencedImageSequence
    ds.private_block(0x0009, "VENDOR", create=True).add_new(0x01, "LO", "DOE")
    ds.add_new(0x7FE00010, "OB", pixels)
    ds.add_new(0x7FE10010, "LO", "VENDOR AFTER PIXELS")
    if undefined:
        ds[0x00081140].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


SYNTAXES = st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
IDENTIFIED = st.builds(_identified, SYNTAXES, st.binary(max_size=32), st.booleans())


def _deidentified(deid: Deidentifier, data: bytes, sizes: list[int]) -> bytes | type[BaseException]:
    try:
        return b"".join(deid.stream(chunked(data, sizes)))
    except (TrolleyError, ExcludedByProfile) as exc:
        return type(exc)


def deid_property(data: bytes, sizes: list[int]) -> None:
    """Only our errors escape; where both paths write a file, the header rewritten from the walk is the one
    pydicom's reader gives; an exclusion is decided the same way. (Where exactly one refuses, the walk and pydicom
    read a broken file differently: an unknown VR in a group length, say, which the walk never decodes.)"""
    by_spans, by_pydicom = _deidentified(BY_SPANS, data, sizes), _deidentified(BY_PYDICOM, data, sizes)
    if isinstance(by_spans, bytes) and isinstance(by_pydicom, bytes) and by_spans != by_pydicom:
        assert _elements(by_spans) == _elements(by_pydicom)  # a broken value written back padded another way
    assert (by_spans is ExcludedByProfile) == (by_pydicom is ExcludedByProfile)


def test_an_unknown_element_of_undefined_length_is_de_identified_inside() -> None:
    """Found by the property below: ReferencedImageSequence under a tag no dictionary knows, (0000,1140), of
    undefined length, in implicit VR. pydicom reads such an element as a sequence and pseudonymises the UID in its
    item; the walk's path copied it as it came, UID included."""
    data = _identified(ImplicitVRLittleEndian, b"", True)
    marker = struct.pack("<HH", 0x0008, 0x1140)
    assert data.count(marker) == 1
    data = data.replace(marker, struct.pack("<HH", 0x0000, 0x1140))
    by_spans, by_pydicom = _deidentified(BY_SPANS, data, []), _deidentified(BY_PYDICOM, data, [])
    assert isinstance(by_spans, bytes) and isinstance(by_pydicom, bytes), (by_spans, by_pydicom)
    assert REF.instance_uid.encode() not in by_spans and REF.instance_uid.encode() not in by_pydicom
    deid_property(data, [])


def _elements(data: bytes) -> list[tuple[int, str, Any]]:
    """What pydicom reads from a file: every element, nested ones too, and the file meta but its group length."""
    ds = dcmread(BytesIO(data), force=True)
    found = [(int(e.tag), str(e.VR), e.value) for e in ds.file_meta if e.tag != 0x00020000]
    return found + [(int(e.tag), str(e.VR), e.value if e.VR != "SQ" else None) for e in ds.iterall()]


# --------------------------------------------------------------------------------------------- cohort CSV

CSV_CELLS = st.sampled_from(
    ["1.2.3", "1.2.840.10008.1", "", "A*", "20240101", "2024-01-01", "20241399", "x" * 70, '"q""', "\\", "é", "\x00"]
)
CSV_HEADERS = st.lists(
    st.sampled_from(
        [
            "StudyInstanceUID",
            "AccessionNumber",
            "PatientID",
            "StudyDate",
            "StudyDateFrom",
            "StudyDateTo",
            "PatientName",
            "Unknown",
            "",
            "studyinstanceuid",
        ]
    ),
    max_size=5,
)


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    header = ",".join(draw(CSV_HEADERS))
    rows = [",".join(draw(st.lists(CSV_CELLS, max_size=6))) for _ in range(draw(st.integers(0, 4)))]
    text = "\n".join([header, *rows]).encode("utf-8")
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"])) + text


def csv_property(data: bytes, skip_bad_rows: bool) -> None:
    path = _WORK / "cohort.csv"
    path.write_bytes(data)
    only_our_errors(lambda: list(iter_csv_rows(path, skip_bad_rows=skip_bad_rows)))


# ------------------------------------------------------------------------------------------------- the runs

PROPERTIES: list[tuple[str, Callable[..., None], tuple[st.SearchStrategy[Any], ...]]] = [
    ("multipart", multipart_property, (multipart_bodies(), mutated(st.binary(max_size=200)), SIZES)),
    ("qido-json", json_property, (DICOM_JSON | ANY_JSON, mutated(DICOM_JSON.map(lambda d: json.dumps(d).encode())))),
    ("mint-xml", mint_property, (mutated(mint_documents()), st.sampled_from(list(QueryLevels)), SIZES)),
    ("rad69-xml", rad69_property, (mutated(rad69_documents()), SIZES)),
    ("part10", part10_property, (mutated(PART10), SIZES)),
    ("cohort-csv", csv_property, (mutated(csv_files()), st.booleans())),
    ("deid", deid_property, (mutated(IDENTIFIED), SIZES)),
]


def _run(prop: Callable[..., None], strategies: tuple[st.SearchStrategy[Any], ...], examples: int) -> None:
    settings(max_examples=examples)(given(*strategies)(prop))()


@pytest.mark.parametrize(("name", "prop", "strategies"), PROPERTIES, ids=[p[0] for p in PROPERTIES])
def test_only_our_errors_escape(name: str, prop: Callable[..., None], strategies: tuple[Any, ...]) -> None:
    _run(prop, strategies, FUZZ_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "prop", "strategies"), PROPERTIES, ids=[p[0] for p in PROPERTIES])
def test_only_our_errors_escape_long(name: str, prop: Callable[..., None], strategies: tuple[Any, ...]) -> None:
    _run(prop, strategies, SLOW_EXAMPLES)
