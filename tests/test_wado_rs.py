"""WADO-RS against the real Orthanc (series and study level, transcoding) and against local fakes (406, truncation)."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
import requests

from tests.conftest import RunningOrthanc
from tests.fakehttp import FakeHTTPServer, Reply
from tests.http_fakes import multipart
from trolley_tasks.core import Instance, InstanceReference, Series, Study, StudyReference
from trolley_tasks.downloaders import Downloader
from trolley_tasks.downloaders.base import payload_bytes
from trolley_tasks.downloaders.wado_rs import WadoRS
from trolley_tasks.errors import (
    NonSeriesParameterError,
    NotFoundError,
    PayloadInvalidError,
    RequestRejectedError,
    ServerError,
)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


def study_tree(orthanc: RunningOrthanc, index: int, with_instances: bool) -> Study:
    """A study as a searcher returns it, with its series (and their instances when asked)."""
    items = orthanc.cohort.in_study(orthanc.cohort.study_refs()[index].study_uid)
    study = Study(items[0].study_uid)
    for item in items:
        series = next((s for s in study.series if s.uid == item.series_uid), None) or study.add_series(
            Series(item.series_uid)
        )
        if with_instances:
            series.add_instance(Instance(item.sop_instance_uid))
    return study


def check_identical(orthanc: RunningOrthanc, study_uid: str, files: dict[InstanceReference, bytes]) -> None:
    items = orthanc.cohort.in_study(study_uid)
    assert sorted(files) == sorted(item.reference() for item in items)
    for item in items:
        assert files[item.reference()] == orthanc.cohort.encode(item)


@pytest.mark.parametrize("with_instances", [False, True], ids=["series-known", "instances-known"])
def test_series_level_download_of_a_study(orthanc: RunningOrthanc, with_instances: bool) -> None:
    study = study_tree(orthanc, 0, with_instances)
    downloader = WadoRS(requests.Session(), orthanc.dicomweb_url)
    assert isinstance(downloader, Downloader)
    files = {ref: payload_bytes(payload) for ref, payload in downloader.iter_raw(study)}
    print(f"\nWADO-RS per series ({'instances known' if with_instances else 'series known'}): {len(files)} files")
    check_identical(orthanc, study.uid, files)


def test_study_level_download(orthanc: RunningOrthanc) -> None:
    study_uid = orthanc.cohort.study_refs()[2].study_uid
    downloader = WadoRS(requests.Session(), orthanc.dicomweb_url, request_per_series=False)
    files = {}
    for ref, payload in downloader.iter_raw(StudyReference(study_uid)):
        assert not isinstance(payload, bytes)
        files[ref] = b"".join(payload)
    print(f"\nWADO-RS study level: study {study_uid}: {len(files)} files")
    check_identical(orthanc, study_uid, files)


def test_per_series_needs_series(orthanc: RunningOrthanc) -> None:
    with pytest.raises(NonSeriesParameterError):
        WadoRS(requests.Session(), orthanc.dicomweb_url).iter_raw(
            StudyReference(orthanc.cohort.study_refs()[0].study_uid)
        )


def test_subset_of_a_series_skips_the_rest(orthanc: RunningOrthanc) -> None:
    refs = orthanc.cohort.instance_refs()[:3]
    asked = [refs[2], refs[0]]
    got = [ref for ref, _ in WadoRS(requests.Session(), orthanc.dicomweb_url).iter_raw(asked)]
    assert sorted(got) == sorted(asked)


def test_missing_instance_raises_after_the_others(orthanc: RunningOrthanc) -> None:
    refs = orthanc.cohort.instance_refs()[:3]
    ghost = InstanceReference(refs[0].study_uid, refs[0].series_uid, "1.2.3.4.404")
    delivered = []
    with pytest.raises(NotFoundError, match="1.2.3.4.404"):
        for ref, payload in WadoRS(requests.Session(), orthanc.dicomweb_url).iter_raw([*refs, ghost]):
            delivered.append(ref)
            payload_bytes(payload)
    assert sorted(delivered) == sorted(refs)


@pytest.mark.parametrize("syntax", [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
def test_named_transfer_syntax(orthanc: RunningOrthanc, syntax: str) -> None:
    series = orthanc.cohort.series_refs()[1]
    downloader = WadoRS(requests.Session(), orthanc.dicomweb_url, transfer_syntax=syntax)
    datasets = list(downloader.datasets(series))
    assert len(datasets) == 3
    originals = {item.sop_instance_uid: orthanc.cohort.dataset(item) for item in orthanc.cohort}
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.PixelData == originals[ds.SOPInstanceUID].PixelData


def test_syntax_orthanc_cannot_produce_is_a_clear_error(orthanc: RunningOrthanc) -> None:
    jpeg = "1.2.840.10008.1.2.4.50"
    downloader = WadoRS(requests.Session(), orthanc.dicomweb_url, transfer_syntax=jpeg)
    with pytest.raises((ServerError, RequestRejectedError), match=f"transfer syntax {jpeg}.*transcode"):
        list(downloader.iter_raw(orthanc.cohort.series_refs()[0]))


def test_406_is_a_clear_rejection() -> None:
    with FakeHTTPServer(lambda request: Reply(406, [b"no"], {"Content-Type": "text/plain"})) as fake:
        downloader = WadoRS(requests.Session(), fake.url, transfer_syntax="1.2.840.10008.1.2.4.80")
        with pytest.raises(RequestRejectedError, match="does not transcode to transfer syntax 1.2.840.10008.1.2.4.80"):
            list(downloader.iter_raw(InstanceReference("1.2.3", "1.2.3.4", "1.2.3.4.5")))
        assert "transfer-syntax=1.2.840.10008.1.2.4.80" in fake.requests[0].headers["accept"]


def fake_series(orthanc: RunningOrthanc, *, close: bool, syntax: str | None = None) -> tuple[Reply, list]:
    items = orthanc.cohort.in_study(orthanc.cohort.study_refs()[0].study_uid)[:3]
    part_type = "application/dicom" + (f"; transfer-syntax={syntax}" if syntax else "")
    body = multipart([({"Content-Type": part_type}, orthanc.cohort.encode(item)) for item in items], "xyz", close=close)
    if not close:
        body = body[:-1000]  # and the last part is cut short
    content_type = 'multipart/related; type="application/dicom"; boundary=xyz'
    return Reply(200, [body], {"Content-Type": content_type}), items


def test_truncated_multipart_is_invalid_payload(orthanc: RunningOrthanc) -> None:
    response, items = fake_series(orthanc, close=False)
    with FakeHTTPServer(lambda request: response) as fake:
        delivered = []
        with pytest.raises(PayloadInvalidError, match="truncated"):
            for ref, payload in WadoRS(requests.Session(), fake.url).iter_raw(items[0].reference().series()):
                data = payload_bytes(payload)
                delivered.append(ref)
                assert pydicom.dcmread(BytesIO(data)).SOPInstanceUID == ref.instance_uid
    assert delivered == [item.reference() for item in items[:2]]  # the cut part was never handed over whole


@pytest.mark.parametrize(
    "declared,asked,says",
    [(IMPLICIT_VR_LE, EXPLICIT_VR_LE, "part's Content-Type says"), (None, IMPLICIT_VR_LE, "file meta")],
)
def test_part_in_another_syntax_is_invalid_payload(
    orthanc: RunningOrthanc, declared: str | None, asked: str, says: str
) -> None:
    response, items = fake_series(orthanc, close=True, syntax=declared)  # the files are explicit VR LE
    with FakeHTTPServer(lambda request: response) as fake:
        downloader = WadoRS(requests.Session(), fake.url, transfer_syntax=asked)
        with pytest.raises(PayloadInvalidError, match=f"asked for transfer syntax {asked}, the {says}"):
            list(downloader.iter_raw(items[0].reference().series()))
