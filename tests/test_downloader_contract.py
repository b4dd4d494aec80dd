"""One contract every downloader passes (see trolley_tasks/downloaders/base.py), run against real servers.

To add a downloader, append one ``pytest.param(factory, id=...)`` to DOWNLOADER_FACTORIES: ``factory(orthanc,
tmp_path)`` returns a Downloader talking to the session's Orthanc (which serves STANDARD_COHORT). The downloader is
closed after each test. RAD-69 has no public server: its entry uses the local fake, serving the same cohort's bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import STANDARD_COHORT, RunningOrthanc
from tests.fakehttp import FakeHTTPServer
from tests.http_fakes import Rad69Responder
from trolley_tasks.core import InstanceReference, SeriesReference, StudyReference
from trolley_tasks.downloaders import Downloader
from trolley_tasks.downloaders.base import parse_dataset, payload_bytes
from trolley_tasks.downloaders.rad69 import Rad69
from trolley_tasks.downloaders.wado_rs import WadoRS
from trolley_tasks.downloaders.wado_uri import WadoURI
from trolley_tasks.errors import ErrorClass, NonSeriesParameterError, NotFoundError

Factory = Callable[[RunningOrthanc, Path], Downloader]

_fake_rad69: list[FakeHTTPServer] = []


def rad69_factory(orthanc: RunningOrthanc, tmp_path: Path) -> Downloader:
    if not _fake_rad69:
        files = {item.sop_instance_uid: STANDARD_COHORT.encode(item) for item in STANDARD_COHORT}
        _fake_rad69.append(FakeHTTPServer(Rad69Responder(files)))
    return Rad69(requests.Session(), f"{_fake_rad69[0].url}/rad69")


DOWNLOADER_FACTORIES = [
    pytest.param(lambda orthanc, tmp_path: WadoURI(requests.Session(), orthanc.wado_url), id="wado-uri"),
    pytest.param(lambda orthanc, tmp_path: WadoRS(requests.Session(), orthanc.dicomweb_url), id="wado-rs-series"),
    pytest.param(
        lambda orthanc, tmp_path: WadoRS(requests.Session(), orthanc.dicomweb_url, request_per_series=False),
        id="wado-rs-per-object",
    ),
    pytest.param(rad69_factory, id="rad69-fake"),
    pytest.param(lambda orthanc, tmp_path: orthanc.c_get(), id="c-get"),
    pytest.param(lambda orthanc, tmp_path: orthanc.c_move(spool_dir=tmp_path / "spool"), id="c-move"),
]


@pytest.fixture(scope="module", autouse=True)
def _stop_fakes() -> Iterator[None]:
    yield
    while _fake_rad69:
        _fake_rad69.pop().stop()


@pytest.fixture(params=DOWNLOADER_FACTORIES)
def downloader(request: pytest.FixtureRequest, orthanc: RunningOrthanc, tmp_path: Path) -> Iterator[Downloader]:
    factory: Factory = request.param
    made = factory(orthanc, tmp_path)
    yield made
    made.close()


def series_instances(index: int) -> list[InstanceReference]:
    series = STANDARD_COHORT.series_refs()[index]
    return [ref for ref in STANDARD_COHORT.instance_refs() if ref.series() == series]


PROTOCOL_METHODS = ("iter_raw", "datasets", "get_dataset", "close")


def test_implements_every_protocol_method(downloader: Downloader) -> None:
    """Not ``isinstance`` (a runtime-checkable Protocol only sees names, which the base class always has): each
    method must be a real implementation, and the batching preference a real bool."""
    for name in PROTOCOL_METHODS:
        assert getattr(type(downloader), name) is not getattr(Downloader, name), name
    assert downloader.whole_series is (isinstance(downloader, WadoRS) and downloader.request_per_series)


def test_iter_raw_delivers_exactly_what_was_asked(downloader: Downloader) -> None:
    asked = series_instances(1)
    got = {}
    for ref, payload in downloader.iter_raw(asked):
        assert ref not in got, f"{ref} delivered twice"
        got[ref] = parse_dataset(payload_bytes(payload), ref)  # parseable, and the SOPInstanceUID asked for
    assert sorted(got) == sorted(asked)
    for ref, dataset in got.items():
        assert dataset.SeriesInstanceUID == ref.series_uid and dataset.StudyInstanceUID == ref.study_uid


def test_datasets_and_get_dataset_agree(downloader: Downloader) -> None:
    asked = series_instances(2)
    datasets = {ds.SOPInstanceUID: ds for ds in downloader.datasets(asked)}
    assert sorted(datasets) == sorted(ref.instance_uid for ref in asked)
    one = downloader.get_dataset(asked[1])
    assert one.SOPInstanceUID == asked[1].instance_uid
    assert one.PixelData == datasets[asked[1].instance_uid].PixelData
    assert one.PatientID == datasets[asked[1].instance_uid].PatientID


def test_a_missing_instance_raises_after_the_others_are_delivered(downloader: Downloader) -> None:
    real = series_instances(3)
    ghost = InstanceReference(real[0].study_uid, real[0].series_uid, "1.2.826.0.1.3680043.8.498.404404")
    delivered = []
    with pytest.raises(NotFoundError) as raised:  # the retry table fails NotFoundError at once, and only it
        for ref, payload in downloader.iter_raw([real[0], ghost, *real[1:]]):
            payload_bytes(payload)
            delivered.append(ref)
    assert sorted(delivered) == sorted(real), "the others must be delivered before the error, never dropped"
    assert raised.value.error_class is ErrorClass.NOT_FOUND


@pytest.mark.parametrize("level", ["study", "series"])
def test_an_unsupported_level_raises_before_yielding(downloader: Downloader, level: str) -> None:
    """A study or series reference is either refused up front (Non*ParameterError) or delivered whole."""
    study = STANDARD_COHORT.study_refs()[0]
    if level == "study":
        target: StudyReference | SeriesReference = study
        expected = {item.reference() for item in STANDARD_COHORT.in_study(study.study_uid)}
    else:
        target = STANDARD_COHORT.series_refs()[0]
        expected = set(series_instances(0))
    try:
        results = iter(downloader.iter_raw(target))
        first_ref, first_payload = next(results)
    except NonSeriesParameterError:
        return  # refused before yielding anything (NonInstanceParameterError is a NonSeriesParameterError)
    payload_bytes(first_payload)
    delivered = [first_ref]
    for ref, payload in results:
        payload_bytes(payload)
        delivered.append(ref)
    assert sorted(delivered) == sorted(expected)


def test_close_releases_and_is_idempotent(downloader: Downloader) -> None:
    for _, payload in downloader.iter_raw(series_instances(4)[:1]):
        payload_bytes(payload)
    associations = getattr(downloader, "associations", None)
    session = getattr(downloader, "session", None)
    if associations is not None:
        assert associations.is_open  # reused between calls until closed
    downloader.close()
    downloader.close()
    if associations is not None:
        assert not associations.is_open
    if session is not None:  # the caller's session: its pooled connections are the caller's to close
        assert session.adapters["http://"].poolmanager.pools  # type: ignore[attr-defined]
    receiver = getattr(downloader, "receiver", None)
    if receiver is not None:
        assert not receiver.running
