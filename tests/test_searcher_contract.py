"""One contract that every searcher passes, against the same cohort (STANDARD_COHORT).

To add a searcher, add one ``ContractCase`` to ``CASES``: an id and a function from the ``ContractEnv`` (the running
Orthanc, the fake MINT server's URL) to a Searcher. For example::

    ContractCase("dicom_qr", lambda env: DICOMQR(host="127.0.0.1", port=env.orthanc.dicom_port,
                                                 aet="TROLLEY", aec=env.orthanc.aet)),

``searches=False`` marks a searcher that can only expand a study named by UID (WADO-RS metadata): the contract then
checks that it refuses other queries clearly instead of answering them wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.conftest import STANDARD_COHORT, RunningOrthanc
from tests.mint_fake import start_mint_server
from trolley_tasks.core import DICOMObjectLevels, Query, QueryLevels, to_instance_refs
from trolley_tasks.errors import AmbiguousResultError, StudyNotFoundError, UnSupportedParameterError
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.searchers.caching import CachedSearcher, DICOMObjectCache
from trolley_tasks.searchers.dicom_qr import DICOMQR
from trolley_tasks.searchers.mint import Mint
from trolley_tasks.searchers.qido_rs import QidoRS
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata


@dataclass
class ContractEnv:
    orthanc: RunningOrthanc
    mint_url: str


@dataclass
class ContractCase:
    id: str
    factory: Callable[[ContractEnv], Searcher]
    searches: bool = True


CASES: list[ContractCase] = [
    ContractCase("qido_rs", lambda env: QidoRS(requests.Session(), env.orthanc.dicomweb_url)),
    ContractCase(
        "qido_rs_per_series", lambda env: QidoRS(requests.Session(), env.orthanc.dicomweb_url, relational=False)
    ),
    ContractCase("qido_rs_paged", lambda env: QidoRS(requests.Session(), env.orthanc.dicomweb_url, page_size=2)),
    ContractCase(
        "cached_qido_rs",
        lambda env: CachedSearcher(
            QidoRS(requests.Session(), env.orthanc.dicomweb_url), DICOMObjectCache(expiry_seconds=60)
        ),
    ),
    ContractCase("mint", lambda env: Mint(requests.Session(), env.mint_url)),
    ContractCase(
        "wado_rs_metadata", lambda env: WadoRSMetadata(requests.Session(), env.orthanc.dicomweb_url), searches=False
    ),
    ContractCase("dicom_qr", lambda env: DICOMQR("127.0.0.1", env.orthanc.dicom_port, "TROLLEY", env.orthanc.aet)),
]

ITEM = STANDARD_COHORT.instance(1, 1, 2)
UNKNOWN_UID = "1.2.826.0.1.3680043.8.498.999999"


@pytest.fixture(scope="module")
def env(orthanc: RunningOrthanc) -> Iterator[ContractEnv]:
    with start_mint_server(STANDARD_COHORT) as mint:
        yield ContractEnv(orthanc, mint.url + "/mint")


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request: pytest.FixtureRequest, env: ContractEnv) -> tuple[ContractCase, Searcher]:
    contract_case: ContractCase = request.param
    return contract_case, contract_case.factory(env)


def test_implements_every_protocol_method(case: tuple[ContractCase, Searcher]) -> None:
    """Not ``isinstance`` (a runtime-checkable Protocol only sees names): each method is a real implementation."""
    for name in ("find_studies", "find_study", "find_study_by_id", "close"):
        assert getattr(type(case[1]), name) is not getattr(Searcher, name), name


def test_close_releases_only_what_the_searcher_opened(case: tuple[ContractCase, Searcher]) -> None:
    contract_case, searcher = case
    searcher.find_study_by_id(ITEM.study_uid)
    associations = getattr(searcher, "associations", None)
    inner = getattr(searcher, "searcher", searcher)  # a CachedSearcher closes the searcher it wraps
    session = getattr(inner, "session", None)
    if associations is not None:
        assert associations.is_open
    searcher.close()
    searcher.close()
    if associations is not None:
        assert not associations.is_open
    if session is not None:  # made by the test, so the caller's: still open
        assert session.adapters["http://"].poolmanager.pools


def test_find_studies_by_patient_id(case: tuple[ContractCase, Searcher]) -> None:
    spec, searcher = case
    query = Query(PatientID=ITEM.patient_id)
    if not spec.searches:
        with pytest.raises(UnSupportedParameterError):
            searcher.find_studies(query)
        return
    studies = searcher.find_studies(query)
    assert [s.uid for s in studies] == [ITEM.study_uid]
    assert studies[0].data.PatientID == ITEM.patient_id
    assert studies[0].data.StudyInstanceUID == ITEM.study_uid


def test_find_study_exactly_one(case: tuple[ContractCase, Searcher]) -> None:
    spec, searcher = case
    assert searcher.find_study(Query(StudyInstanceUID=ITEM.study_uid)).uid == ITEM.study_uid
    with pytest.raises(StudyNotFoundError):
        searcher.find_study(Query(StudyInstanceUID=UNKNOWN_UID))
    if spec.searches:
        with pytest.raises(StudyNotFoundError):
            searcher.find_study(Query(PatientID="NOBODY"))
        with pytest.raises(AmbiguousResultError):
            searcher.find_study(Query(PatientID="TT07*"))


@pytest.mark.parametrize("level", list(QueryLevels), ids=[level.value for level in QueryLevels])
def test_find_study_by_id_fills_the_tree_to_the_level(case: tuple[ContractCase, Searcher], level: QueryLevels) -> None:
    _, searcher = case
    loaded = STANDARD_COHORT.in_study(ITEM.study_uid)
    study = searcher.find_study_by_id(ITEM.study_uid, level)
    assert study.uid == ITEM.study_uid and study.data.StudyInstanceUID == ITEM.study_uid
    if level == QueryLevels.STUDY:
        assert study.series == []
        return
    assert sorted(s.uid for s in study.series) == sorted({item.series_uid for item in loaded})
    assert all(s.data.SeriesInstanceUID == s.uid and s.parent is study for s in study.series)
    if level == QueryLevels.SERIES:
        assert study.all_instances() == []
        return
    assert study.max_object_depth() == DICOMObjectLevels.INSTANCE
    assert sorted(to_instance_refs(study)) == sorted(item.reference() for item in loaded)
    assert len(study.all_instances()) == len(loaded) == 6
    assert all(i.data.SOPInstanceUID == i.uid for i in study.all_instances())


def test_unknown_uid(case: tuple[ContractCase, Searcher]) -> None:
    _, searcher = case
    assert searcher.find_studies(Query(StudyInstanceUID=UNKNOWN_UID, query_level=QueryLevels.INSTANCE)) == []
    with pytest.raises(StudyNotFoundError):
        searcher.find_study_by_id(UNKNOWN_UID, QueryLevels.INSTANCE)
