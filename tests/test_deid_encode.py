"""The de-identified header's writer (``trolley_tasks.deid.encode``) gives the bytes pydicom's ``save_as`` gives,
for every kind of instance of the research cohort, in explicit and implicit VR."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from testbed.cohort import ResearchCohort
from trolley_tasks.deid import BUILT_IN, Deidentifier
from trolley_tasks.deid.encode import encode

COHORT = ResearchCohort(studies=2, series=1, instances=2, seed=41)
DEID = Deidentifier(BUILT_IN["basic"], b"a key for the encoder test, long enough")


def _header(data: bytes) -> pydicom.FileDataset:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    DEID.dataset(ds)
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_encode_gives_the_bytes_save_as_gives(syntax: str) -> None:
    kinds = set()
    for item in COHORT:
        original = COHORT.dataset(item)
        original.file_meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        original.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        expected = io.BytesIO()
        _header(data).save_as(expected, enforce_file_format=True)
        assert encode(_header(data)) == expected.getvalue(), item.kind
        kinds.add(item.kind)
    assert kinds == {"axial", "scout", "short", "sr", "burned"}
