"""The test bed itself: the generated cohort and the Orthanc fixture that serves it."""

from __future__ import annotations

from io import BytesIO

import pydicom
import requests

from testbed.cohort import generate_cohort
from tests.conftest import STANDARD_COHORT, RunningOrthanc
from trolley_tasks.core import is_valid_uid


def test_cohort_is_reproducible_and_realistic() -> None:
    a, b = generate_cohort(2, 2, 2, seed=3), generate_cohort(2, 2, 2, seed=3)
    assert list(a) == list(b) and len(a) == 8
    assert list(generate_cohort(2, 2, 2, seed=4))[0] != list(a)[0]
    first = next(iter(a))
    encoded = a.encode(first)
    assert encoded == b.encode(first)
    ds = pydicom.dcmread(BytesIO(encoded))
    assert ds.Rows == 512 and ds.Columns == 512 and ds.BitsAllocated == 16
    assert len(ds.PixelData) == 512 * 512 * 2
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == first.sop_instance_uid
    assert ds.PatientID and ds.AccessionNumber and ds.StudyDate
    assert 520_000 < len(encoded) < 530_000
    assert all(is_valid_uid(u) for item in a for u in (item.study_uid, item.series_uid, item.sop_instance_uid))
    assert len({item.sop_instance_uid for item in a}) == 8


def test_orthanc_serves_the_generated_cohort(orthanc: RunningOrthanc) -> None:
    response = requests.get(
        f"{orthanc.dicomweb_url}/studies",
        headers={"Accept": "application/dicom+json", "Accept-Encoding": "identity"},
        timeout=10,
    )
    assert response.status_code == 200
    study_uids = {study["0020000D"]["Value"][0] for study in response.json()}
    assert study_uids == {ref.study_uid for ref in STANDARD_COHORT.study_refs()}
    assert orthanc.statistics()["CountInstances"] == len(STANDARD_COHORT) == 18
