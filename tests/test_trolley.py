"""Trolley: the search/download facade and its NonInstance/NonSeries dance, with fakes; then real downloads of a
generated study from the Orthanc fixture through each live protocol."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom import Dataset

from testbed.cohort import GeneratedCohort, generate_cohort
from tests.conftest import RunningOrthanc
from trolley_tasks.core import (
    Downloadable,
    Instance,
    InstanceReference,
    Query,
    QueryLevels,
    Series,
    SeriesReference,
    Study,
    StudyReference,
    to_instance_refs,
    to_series_level_refs,
)
from trolley_tasks.downloaders.base import DownloaderBase, RawPayload
from trolley_tasks.errors import (
    NonInstanceParameterError,
    NonSeriesParameterError,
    NoReferencesFoundError,
    NotFoundError,
    StudyNotFoundError,
)
from trolley_tasks.searchers.base import SearcherBase
from trolley_tasks.storage.disk import DICOMDiskStorage, FlatStorageDir, QuarantinedPayloadError, StorageDir
from trolley_tasks.trolley import Trolley

COHORT = generate_cohort(studies=2, series=2, instances=2, seed=31, rows=16, columns=16)


class FakeSearcher(SearcherBase):
    """Serves ``COHORT`` as trees, at the depth asked, and records every call."""

    def __init__(self, cohort: GeneratedCohort = COHORT) -> None:
        self.cohort = cohort
        self.calls: list[tuple[str, QueryLevels]] = []

    def tree(self, study_uid: str, level: QueryLevels) -> Study:
        items = self.cohort.in_study(study_uid)
        if not items:
            raise StudyNotFoundError(f"no study {study_uid}")
        study = Study(study_uid)
        if level is QueryLevels.STUDY:
            return study
        for item in items:
            try:
                series = study.get(item.series_uid)
            except KeyError:
                series = study.add_series(Series(item.series_uid))
            if level is QueryLevels.INSTANCE:
                data = Dataset()
                data.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                series.add_instance(Instance(item.sop_instance_uid, data=data))
        return study

    def find_studies(self, query: Query) -> list[Study]:
        self.calls.append(("find_studies", query.query_level))
        uids = sorted({item.study_uid for item in self.cohort})
        if query.StudyInstanceUID:
            uids = [uid for uid in uids if uid == query.StudyInstanceUID]
        return [self.tree(uid, query.query_level) for uid in uids]

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        self.calls.append((study_uid, query_level))
        return self.tree(study_uid, query_level)


class InstanceDownloader(DownloaderBase):
    """Like WADO-URI: instance references only; payloads as chunk iterators."""

    def __init__(self, cohort: GeneratedCohort = COHORT) -> None:
        self.cohort = cohort
        self.asked: list[list[InstanceReference]] = []

    def refs(self, objects: Downloadable | Iterable[Downloadable]) -> list[Any]:
        try:
            return to_instance_refs(objects)
        except NoReferencesFoundError as exc:
            raise NonInstanceParameterError("instance references needed") from exc

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        refs = self.refs(objects)
        self.asked.append(refs)
        by_uid = {item.sop_instance_uid: item for item in self.cohort}
        for ref in refs:
            data = self.cohort.encode(by_uid[ref.instance_uid])
            yield ref, iter([data[:200], data[200:]])


class SeriesDownloader(InstanceDownloader):
    """Like WADO-RS per series: series or instance references; expands series itself."""

    def refs(self, objects: Downloadable | Iterable[Downloadable]) -> list[Any]:
        try:
            level_refs = to_series_level_refs(objects)
        except NoReferencesFoundError as exc:
            raise NonSeriesParameterError("series references needed") from exc
        out: list[InstanceReference] = []
        for ref in level_refs:
            if isinstance(ref, InstanceReference):
                out.append(ref)
            else:
                out.extend(
                    item.reference()
                    for item in self.cohort
                    if (item.study_uid, item.series_uid) == (ref.study_uid, ref.series_uid)
                )
        return out


def underscored(uid: str) -> str:
    return uid.replace(".", "_")


def expected_files(root: Path, items: Iterable[Any]) -> dict[Path, bytes]:
    """Where Trolley's default storage (StorageDir, dicomtrolley's names) puts each item."""
    return {
        root / underscored(item.study_uid) / underscored(item.series_uid) / underscored(item.sop_instance_uid): (
            COHORT.encode(item)
        )
        for item in items
    }


def written(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".trolley" not in p.parts}


STUDY0 = COHORT.study_refs()[0]


def test_study_reference_is_expanded_to_instances_once(tmp_path: Path) -> None:
    searcher, downloader = FakeSearcher(), InstanceDownloader()
    results = Trolley(searcher, downloader).download(STUDY0, tmp_path)
    assert searcher.calls == [(STUDY0.study_uid, QueryLevels.INSTANCE)]
    assert written(tmp_path) == expected_files(tmp_path, COHORT.in_study(STUDY0.study_uid))
    assert len(results) == 4 and not any(r.already_present for r in results)
    again = Trolley(searcher, downloader).download(STUDY0, tmp_path)
    assert all(r.already_present for r in again)


def test_series_reference_fetches_only_that_series(tmp_path: Path) -> None:
    searcher = FakeSearcher()
    series = COHORT.series_refs()[1]
    Trolley(searcher, InstanceDownloader()).download(SeriesReference(series.study_uid, series.series_uid), tmp_path)
    in_series = [item for item in COHORT if item.series_uid == series.series_uid]
    assert written(tmp_path) == expected_files(tmp_path, in_series)
    assert searcher.calls == [(series.study_uid, QueryLevels.INSTANCE)]


def test_series_downloader_expands_studies_to_series_only(tmp_path: Path) -> None:
    searcher, downloader = FakeSearcher(), SeriesDownloader()
    Trolley(searcher, downloader).download(COHORT.study_refs(), tmp_path)
    assert searcher.calls == [(ref.study_uid, QueryLevels.SERIES) for ref in COHORT.study_refs()]
    assert written(tmp_path) == expected_files(tmp_path, COHORT)


def test_searched_trees_need_no_expansion(tmp_path: Path) -> None:
    searcher = FakeSearcher()
    trolley = Trolley(searcher, InstanceDownloader())
    studies = trolley.find_studies(Query(query_level=QueryLevels.INSTANCE))
    trolley.download(studies[0].series[0].instances[:1], tmp_path)
    trolley.download(studies[1], tmp_path)
    assert searcher.calls == [("find_studies", QueryLevels.INSTANCE)]
    first = next(item for item in COHORT if item.sop_instance_uid == studies[0].series[0].instances[0].uid)
    assert written(tmp_path) == expected_files(tmp_path, [first, *COHORT.in_study(studies[1].uid)])


def test_study_searched_at_study_depth_is_expanded(tmp_path: Path) -> None:
    searcher = FakeSearcher()
    trolley = Trolley(searcher, InstanceDownloader(), storage=FlatStorageDir())
    study = trolley.find_study(Query(StudyInstanceUID=STUDY0.study_uid))  # STUDY depth: no series in it
    assert study.series == []
    trolley.download(study, output_dir=tmp_path)
    assert searcher.calls[-1] == (STUDY0.study_uid, QueryLevels.INSTANCE)
    assert sorted(p.name for p in tmp_path.glob("*") if p.is_file()) == sorted(
        underscored(item.sop_instance_uid) for item in COHORT.in_study(STUDY0.study_uid)
    )


def test_fetch_all_datasets_dances_too() -> None:
    trolley = Trolley(FakeSearcher(), InstanceDownloader())
    uids = [ds.SOPInstanceUID for ds in trolley.fetch_all_datasets(STUDY0)]
    assert uids == [item.sop_instance_uid for item in COHORT.in_study(STUDY0.study_uid)]


def test_custom_storage_gets_datasets(tmp_path: Path) -> None:
    class MyStorage(DICOMDiskStorage):
        """Saves to unique uid filename (the seeds' example, with str() around the uuid)."""

        def save(self, dataset: Dataset, path: Any) -> None:  # type: ignore[override]
            dataset.save_as(Path(path) / str(uuid.uuid4()))

    results = Trolley(FakeSearcher(), InstanceDownloader(), storage=MyStorage()).download(STUDY0, tmp_path)
    assert results == []
    files = list(tmp_path.iterdir())
    assert len(files) == 4
    assert {pydicom.dcmread(f).SOPInstanceUID for f in files} == {
        item.sop_instance_uid for item in COHORT.in_study(STUDY0.study_uid)
    }


def test_downloader_refusing_after_expansion_does_not_loop(tmp_path: Path) -> None:
    class Stubborn(InstanceDownloader):
        def refs(self, objects: Any) -> list[Any]:
            raise NonInstanceParameterError("never happy")

    searcher = FakeSearcher()
    with pytest.raises(NonInstanceParameterError):
        Trolley(searcher, Stubborn()).download(STUDY0, tmp_path)
    assert len(searcher.calls) == 1


def test_series_unknown_to_the_searcher_is_not_found(tmp_path: Path) -> None:
    missing = SeriesReference(STUDY0.study_uid, "1.2.3.999")
    with pytest.raises(NotFoundError, match="no series 1.2.3.999"):
        Trolley(FakeSearcher(), InstanceDownloader()).download(missing, tmp_path)


def test_error_mid_download_keeps_what_was_written(tmp_path: Path) -> None:
    class BadSecond(InstanceDownloader):
        def iter_raw(self, objects: Any) -> Iterator[tuple[InstanceReference, RawPayload]]:
            for index, (ref, payload) in enumerate(super().iter_raw(objects)):
                yield ref, (b"<html>oops</html>" if index == 1 else payload)

    with pytest.raises(QuarantinedPayloadError):
        Trolley(FakeSearcher(), BadSecond()).download(STUDY0, tmp_path)
    assert len(written(tmp_path)) == 1 and len(list((tmp_path / ".trolley" / "quarantine").iterdir())) == 1


def test_default_storage_is_storage_dir() -> None:
    trolley = Trolley(FakeSearcher(), InstanceDownloader())
    assert isinstance(trolley.storage, StorageDir) and "StorageDir" in repr(trolley)


# ------------------------------------------------------------------------------------- real Orthanc, each protocol


def _wado_uri(orthanc: Any) -> Any:
    from trolley_tasks.downloaders.wado_uri import WadoURI

    return WadoURI(requests.Session(), orthanc.wado_url)


def _wado_rs(per_series: bool) -> Any:
    def make(orthanc: Any) -> Any:
        from trolley_tasks.downloaders.wado_rs import WadoRS

        return WadoRS(requests.Session(), orthanc.dicomweb_url, request_per_series=per_series)

    return make


@pytest.mark.parametrize(
    ("make", "byte_identical"),
    [
        pytest.param(_wado_uri, True, id="wado-uri"),
        pytest.param(_wado_rs(True), True, id="wado-rs-series"),
        pytest.param(_wado_rs(False), True, id="wado-rs-study"),
        pytest.param(RunningOrthanc.c_get, False, id="c-get"),
        pytest.param(RunningOrthanc.c_move, False, id="c-move"),
    ],
)
def test_download_a_study_from_orthanc(orthanc: Any, tmp_path: Path, make: Any, byte_identical: bool) -> None:
    from tests.conftest import STANDARD_COHORT
    from trolley_tasks.searchers.qido_rs import QidoRS

    study = STANDARD_COHORT.study_refs()[1]
    expected = {item.sop_instance_uid: item for item in STANDARD_COHORT.in_study(study.study_uid)}
    downloader = make(orthanc)
    try:
        trolley = Trolley(searcher=QidoRS(requests.Session(), orthanc.dicomweb_url), downloader=downloader)
        results = trolley.download(StudyReference(study_uid=study.study_uid), tmp_path)
    finally:
        downloader.close()
    files = sorted(written(tmp_path))
    assert len(results) == len(files) == len(expected) == 6
    for path in files:
        dataset = pydicom.dcmread(path)  # a valid Part 10 file
        item = expected[dataset.SOPInstanceUID]
        assert path in expected_files(tmp_path, [item])
        original = STANDARD_COHORT.encode(item)
        if byte_identical:
            assert path.read_bytes() == original
        else:
            assert dataset.PixelData == pydicom.dcmread(BytesIO(original)).PixelData


def test_downloader_that_refuses_eagerly_is_expanded_too(tmp_path: Path) -> None:
    class Eager(InstanceDownloader):
        def iter_raw(self, objects: Any) -> Iterator[tuple[InstanceReference, RawPayload]]:
            refs = self.refs(objects)  # raises at call time, before any generator exists
            return super().iter_raw(refs)

    searcher = FakeSearcher()
    Trolley(searcher, Eager()).download(STUDY0, tmp_path)
    assert written(tmp_path) == expected_files(tmp_path, COHORT.in_study(STUDY0.study_uid))
    assert searcher.calls == [(STUDY0.study_uid, QueryLevels.INSTANCE)]
