"""C-GET and C-MOVE downloads against the real Orthanc fixture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.cohort import generate_cohort
from trolley_tasks.core import QueryLevels, Study, StudyReference
from trolley_tasks.downloaders.base import Downloader, parse_dataset, payload_bytes
from trolley_tasks.downloaders.dicom_qr import CGet, CMove, StorageReceiver
from trolley_tasks.errors import ConfigurationError, ErrorClass, NonInstanceParameterError, NotFoundError
from trolley_tasks.searchers.dicom_qr import DICOMQR

SMALL_COHORT = generate_cohort(studies=1, series=2, instances=3, seed=31, rows=64, columns=64)


def searched_study(orthanc: Any, index: int = 0) -> Study:
    searcher = DICOMQR("127.0.0.1", orthanc.dicom_port, "TROLLEY", orthanc.aet)
    try:
        return searcher.find_study_by_id(orthanc.cohort.study_refs()[index].study_uid, QueryLevels.INSTANCE)
    finally:
        searcher.close()


@pytest.fixture(params=["cget", "cmove"])
def downloader(request: pytest.FixtureRequest, orthanc: Any) -> Iterator[CGet | CMove]:
    made = orthanc.c_get() if request.param == "cget" else orthanc.c_move()
    yield made
    made.close()


def check_delivery(got: list[tuple[Any, bytes]], expected_uids: set[str]) -> None:
    assert len(got) == len(expected_uids)
    for ref, data in got:
        dataset = parse_dataset(payload_bytes(data), ref)  # valid Part 10, and the SOPInstanceUID asked for
        assert dataset.file_meta.MediaStorageSOPInstanceUID == ref.instance_uid
        assert dataset.file_meta.TransferSyntaxUID
        assert dataset.SeriesInstanceUID == ref.series_uid and dataset.StudyInstanceUID == ref.study_uid
    assert {ref.instance_uid for ref, _ in got} == expected_uids


def test_download_searched_study(orthanc: Any, downloader: CGet | CMove) -> None:
    assert isinstance(downloader, Downloader)
    study = searched_study(orthanc)
    expected = {item.sop_instance_uid for item in orthanc.cohort.in_study(study.uid)}
    check_delivery(list(downloader.iter_raw(study)), expected)
    # a second study goes over the same association
    second = searched_study(orthanc, 1)
    check_delivery(list(downloader.iter_raw(second)), {i.uid for i in second.all_instances()})
    assert downloader.associations.associations_opened == 1


def test_datasets_and_get_dataset(orthanc: Any, downloader: CGet | CMove) -> None:
    instance = searched_study(orthanc).all_instances()[0]
    assert downloader.get_dataset(instance).SOPInstanceUID == instance.uid


def test_cget_study_and_series_references(orthanc: Any) -> None:
    ref = orthanc.cohort.study_refs()[0]
    cget = orthanc.c_get()
    try:
        check_delivery(list(cget.iter_raw(ref)), {i.sop_instance_uid for i in orthanc.cohort.in_study(ref.study_uid)})
        series = orthanc.cohort.series_refs()[0]
        in_series = {i.sop_instance_uid for i in orthanc.cohort if i.series_uid == series.series_uid}
        check_delivery(list(cget.iter_raw(series)), in_series)
    finally:
        cget.close()


def test_cmove_needs_instances(orthanc: Any) -> None:
    cmove = orthanc.c_move()
    try:
        with pytest.raises(NonInstanceParameterError):
            cmove.iter_raw(StudyReference(orthanc.cohort.study_refs()[0].study_uid))
    finally:
        cmove.close()


def test_cmove_with_the_hosts_shared_receiver(orthanc: Any, tmp_path: Path) -> None:
    """Engine mode: one receiver per host, started apart; the downloader only reads the spool."""
    spool = tmp_path / "spool"
    peers = {"allowed_aets": [orthanc.aet], "allowed_hosts": ["127.0.0.1"]}
    with StorageReceiver(orthanc.move_aet, "127.0.0.1", orthanc.move_port, spool, **peers) as receiver:
        cmove = orthanc.c_move(run_receiver=False, spool_dir=spool)
        study = searched_study(orthanc, 2)
        check_delivery(list(cmove.iter_raw(study)), {i.uid for i in study.all_instances()})
        cmove.close()
        assert receiver.received == len(study.all_instances())
        assert receiver.running  # the downloader does not stop a receiver it did not start
    assert [p.name for p in spool.iterdir()] == ["expected"]  # every arrival was claimed, no temporary file left
    assert list((spool / "expected").iterdir()) == []  # and every expectation forgotten once its move ended


def test_unknown_move_destination_is_configuration_error(orthanc: Any) -> None:
    cmove = orthanc.c_move(destination_aet="NOWHERE")
    try:
        with pytest.raises(ConfigurationError, match="'NOWHERE'"):
            list(cmove.iter_raw(searched_study(orthanc)))
    finally:
        cmove.close()


@pytest.mark.parametrize("make", ["c_get", "c_move"], ids=["cget", "cmove"])
def test_missing_instance_is_not_found_after_the_rest(orthanc_factory: Callable[..., Any], make: str) -> None:
    pacs = orthanc_factory(SMALL_COHORT)
    refs = SMALL_COHORT.instance_refs()
    gone = refs[1]
    pacs.server.delete_instance(gone.instance_uid)
    downloader = getattr(pacs, make)()
    got: list[str] = []
    try:
        with pytest.raises(NotFoundError) as info:
            for ref, data in downloader.iter_raw(refs):
                parse_dataset(payload_bytes(data), ref)
                got.append(ref.instance_uid)
    finally:
        downloader.close()
    assert info.value.error_class is ErrorClass.NOT_FOUND
    assert gone.instance_uid in str(info.value)
    assert sorted(got) == sorted(ref.instance_uid for ref in refs if ref != gone)
