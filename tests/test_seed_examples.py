"""Every example of the seeds' usage page (shared/seeds/004_*.txt), run as written against our package.

Only three things differ from the page, and each is marked ``# seed:``:

- the import paths are ours (``trolley_tasks...`` instead of ``dicomtrolley...``);
- ``https://server/...`` is the test PACS (an Orthanc on 127.0.0.1 for QIDO-RS, WADO-URI and WADO-RS; a local
  MINT fake for the basic example, since no MINT server exists), and ``/tmp`` is the test's own folder;
- the placeholder UIDs ``"1.1"``, ``"2.2"``, ``"3.3"`` and ``'B*'`` for a StudyInstanceUID are real UIDs of the
  test PACS (no UID starts with B: UIDs are digits and dots).

The PACS holds a cohort shaped for the page: patients named ``B...``, PatientID ``1234``, CT studies on the first
days of March 2020. Examples that only build an object (DICOMQR, Mint, Rad69, WadoRSMetadata constructors) build it
and check what was built; nothing connects to ``hostname`` or ``server``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from testbed.cohort import GeneratedCohort, GeneratedInstance
from tests.mint_fake import start_mint_server
from trolley_tasks.core import (  # seed: dicomtrolley.core
    InstanceReference,
    Query,
    QueryLevels,
    SeriesReference,
    StudyReference,
)
from trolley_tasks.downloaders.rad69 import Rad69, XDSMissingDocumentError  # seed: dicomtrolley.rad69
from trolley_tasks.downloaders.wado_rs import WadoRS  # seed: dicomtrolley.wado_rs
from trolley_tasks.downloaders.wado_uri import WadoURI  # seed: dicomtrolley.wado_uri
from trolley_tasks.searchers.caching import CachedSearcher, DICOMObjectCache  # seed: dicomtrolley.caching
from trolley_tasks.searchers.dicom_qr import DICOMQR  # seed: dicomtrolley.dicom_qr
from trolley_tasks.searchers.mint import Mint  # seed: dicomtrolley.mint
from trolley_tasks.searchers.qido_rs import QidoRS  # seed: dicomtrolley.qido_rs
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata  # seed: dicomtrolley.wado_rs
from trolley_tasks.storage.disk import DICOMDiskStorage, FlatStorageDir  # seed: dicomtrolley.storage
from trolley_tasks.trolley import Trolley  # seed: dicomtrolley.trolley


@dataclass(frozen=True)
class SeedCohort(GeneratedCohort):
    """The generated CT cohort, with the patients the usage page searches for."""

    def instance(self, st: int, se: int, inst: int) -> GeneratedInstance:
        item = super().instance(st, se, inst)
        return replace(item, patient_name=("BAKER^ANNA", "BROWN^BOB")[st], patient_id=("1234", "5678")[st])


COHORT = SeedCohort(studies=2, series=2, instances=2, seed=44, rows=32, columns=32, first_study_date=date(2020, 3, 2))
FILES = {item.sop_instance_uid: COHORT.encode(item) for item in COHORT}


@dataclass
class Servers:
    dicomweb: str
    wado: str
    mint: str


@pytest.fixture(scope="module")
def server(orthanc_factory: Any) -> Iterator[Servers]:
    pacs = orthanc_factory(COHORT)
    mint = start_mint_server(COHORT)
    yield Servers(dicomweb=pacs.dicomweb_url, wado=pacs.wado_url, mint=f"{mint.url}/mint")
    mint.close()


@pytest.fixture
def trolley(server: Servers) -> Trolley:
    """The page's ``trolley``: QIDO-RS to search, WADO-URI to download."""
    session = requests.Session()
    return Trolley(searcher=QidoRS(session, server.dicomweb), downloader=WadoURI(session, server.wado))


def downloaded(root: Path) -> dict[str, bytes]:
    """SOPInstanceUID -> bytes of every file under ``root``; each must be a DICOM file of the cohort."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and ".trolley" not in path.parts:
            out[pydicom.dcmread(path).SOPInstanceUID] = path.read_bytes()
    return out


def cohort_files(*items: GeneratedInstance) -> dict[str, bytes]:
    return {item.sop_instance_uid: FILES[item.sop_instance_uid] for item in items}


BAKER = [item for item in COHORT if item.patient_id == "1234"]
BROWN = [item for item in COHORT if item.patient_id == "5678"]


# --------------------------------------------------------------------------------------------------- basic example


def test_basic_example(server: Servers, tmp_path: Path) -> None:
    # Create a http session
    session = requests.Session()
    # Use this session to create a trolley using MINT and WADO
    trolley = Trolley(
        searcher=Mint(session, server.mint),  # seed: "https://server/mint"
        downloader=WadoURI(session, server.wado),  # seed: "https://server/wado_uri"
    )
    # find some studies
    studies = trolley.find_studies(Query(PatientName="B*"))
    # download the first one
    trolley.download(studies[0], output_dir=tmp_path / "trolley")  # seed: '/tmp/trolley'

    assert len(studies) == 2
    first = [item for item in COHORT if item.study_uid == studies[0].uid]
    assert downloaded(tmp_path / "trolley") == cohort_files(*first)


# ---------------------------------------------------------------------------------------------- finding studies


def test_finding_studies(trolley: Trolley) -> None:
    # Find all studies for patients starting with 'B'
    studies = trolley.find_studies(Query(PatientName="B*"))
    assert sorted(s.uid for s in studies) == sorted(ref.study_uid for ref in COHORT.study_refs())

    # Find CT studies from the first three days of March 2020
    # Include patient birth date and referring physician in results
    studies = trolley.find_studies(
        Query(
            ModalitiesInStudy="CT*",
            min_study_date=datetime(year=2020, month=3, day=1),
            max_study_date=datetime(year=2020, month=3, day=3),
            include_fields=["PatientBirthDate", "ReferringPhysicianName"],
        )
    )
    assert len(studies) == 2
    for study in studies:
        assert study.data.PatientBirthDate and str(study.data.ReferringPhysicianName) == "REFERRER^TROLLEY"


def test_finding_series_and_instance_details(trolley: Trolley) -> None:
    study_uid = BAKER[0].study_uid
    studies = trolley.find_studies(  # find studies series and instances
        Query(StudyInstanceUID=study_uid, query_level=QueryLevels.INSTANCE)  # seed: 'B*'
    )
    a_series = studies[0].series[0]  # studies now contain series
    an_instance = a_series.instances[0]  # and series contain instances

    assert isinstance(an_instance.data, pydicom.Dataset)  # an_instance.data  # {pydicom.Dataset} instance
    assert an_instance.data.Rows == 32  # an_instance.data.Rows  # {int} 100
    assert an_instance.data["Rows"].keyword == "Rows"  # an_instance.data["Rows"]  # {DataElement} instance
    assert len(studies[0].series) == 2 and all(len(s.instances) == 2 for s in studies[0].series)


# --------------------------------------------------------------------------------------------- downloading images


def test_downloading_images(trolley: Trolley, tmp_path: Path) -> None:
    studies = trolley.find_studies(Query(PatientName="B*", query_level=QueryLevels.INSTANCE))
    every, one, series, three = (tmp_path / name for name in ("all", "study", "series", "three"))
    trolley.download(studies, every)  # all studies                                     seed: '/tmp'
    trolley.download(studies[0], one)  # a single study
    trolley.download(studies[0].series[0], series)  # a single series
    trolley.download(studies[0].series[0].instances[:3], three)  # first 3 instances

    assert downloaded(every) == FILES
    first_study = [item for item in COHORT if item.study_uid == studies[0].uid]
    assert downloaded(one) == cohort_files(*first_study)
    first_series = [item for item in COHORT if item.series_uid == studies[0].series[0].uid]
    assert downloaded(series) == cohort_files(*first_series)
    assert downloaded(three) == cohort_files(*first_series[:3])


def test_downloading_references(trolley: Trolley, tmp_path: Path) -> None:
    item = BROWN[-1]
    trolley.download(StudyReference(study_uid=item.study_uid), tmp_path / "a")  # seed: "1.1", "/tmp"
    trolley.download(SeriesReference(study_uid=item.study_uid, series_uid=item.series_uid), tmp_path / "b")
    trolley.download(
        InstanceReference(study_uid=item.study_uid, series_uid=item.series_uid, instance_uid=item.sop_instance_uid),
        tmp_path / "c",
    )

    assert downloaded(tmp_path / "a") == cohort_files(*BROWN)
    assert downloaded(tmp_path / "b") == cohort_files(*[i for i in BROWN if i.series_uid == item.series_uid])
    assert downloaded(tmp_path / "c") == cohort_files(item)


def test_downloading_datasets(trolley: Trolley, tmp_path: Path) -> None:
    studies = trolley.find_studies(  # find study including instances
        Query(PatientID="1234", query_level=QueryLevels.INSTANCE)
    )
    for ds in trolley.fetch_all_datasets(studies):  # obtain Dataset for each instance
        ds.save_as(f"{tmp_path}/{ds.SOPInstanceUID}.dcm")  # seed: f'/tmp/{ds.SOPInstanceUID}.dcm'

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i.sop_instance_uid}.dcm" for i in BAKER)
    for item in BAKER:
        saved = pydicom.dcmread(tmp_path / f"{item.sop_instance_uid}.dcm")
        assert saved.PixelData == pydicom.dcmread(BytesIO(FILES[item.sop_instance_uid])).PixelData


# ------------------------------------------------------------------------------------ choosing searchers/downloaders


def test_choosing_a_searcher(server: Servers) -> None:
    searcher = DICOMQR(host="hostname", port="123", aet="DICOMTROLLEY", aec="ANY-SCP")
    assert "hostname" in repr(searcher) and "ANY-SCP" in repr(searcher)  # built; nothing connects until a search

    searcher = Mint(requests.session(), "http://server/mint")
    assert isinstance(searcher, Mint)

    session = requests.Session()
    searcher = QidoRS(session=session, url=server.dicomweb)  # seed: "http://server/qido"
    assert [s.uid for s in searcher.find_studies(Query(PatientID="5678"))] == [BROWN[0].study_uid]


def test_choosing_a_downloader(server: Servers) -> None:
    downloader = WadoURI(requests.session(), server.wado)  # seed: "https://server/wado"
    item = BAKER[0]
    assert downloader.get_dataset(item.reference()).SOPInstanceUID == item.sop_instance_uid

    searcher = Rad69(session=requests.session(), url="https://server/rad69")
    assert isinstance(searcher, Rad69)

    searcher = WadoRS(session=requests.session(), url=server.dicomweb)  # seed: "https://server/wadors"
    assert [ds.SOPInstanceUID for ds in searcher.datasets(item.reference())] == [item.sop_instance_uid]

    searcher = WadoRSMetadata(session=requests.session(), url=server.dicomweb)  # seed: "https://server/wadors"
    study = searcher.find_study_by_id(item.study_uid, query_level=QueryLevels.INSTANCE)
    assert sorted(i.uid for i in study.all_instances()) == sorted(i.sop_instance_uid for i in BAKER)


# ------------------------------------------------------------------------------------------------ download format


def test_flat_storage_dir(server: Servers, tmp_path: Path) -> None:
    a_searcher, a_downloader = QidoRS(requests.Session(), server.dicomweb), WadoRS(requests.Session(), server.dicomweb)

    # Creates no sub-folders, just write to single flat file
    storage = FlatStorageDir(path=tmp_path)  # seed: path='/tmp'
    trolley = Trolley(searcher=a_searcher, downloader=a_downloader, storage=storage)

    trolley.download(StudyReference(BAKER[0].study_uid), tmp_path)
    files = [p for p in tmp_path.iterdir() if p.is_file()]  # dicomtrolley's flat names: 1_2_3, no extension
    assert sorted(p.name for p in files) == sorted(i.sop_instance_uid.replace(".", "_") for i in BAKER)
    assert all(p.read_bytes() == FILES[p.name.replace("_", ".")] for p in files)  # as the PACS stored them


def test_custom_storage_as_written(server: Servers, tmp_path: Path) -> None:
    a_searcher, a_downloader = QidoRS(requests.Session(), server.dicomweb), WadoURI(requests.Session(), server.wado)

    class MyStorage(DICOMDiskStorage):
        """Saves to unique uid filename"""

        def save(self, dataset, path):  # type: ignore[no-untyped-def]
            dataset.save_as(Path(path) / uuid.uuid4())

    trolley = Trolley(searcher=a_searcher, downloader=a_downloader, storage=MyStorage())

    # The page's own bug, not ours: pathlib cannot join a UUID object (it needs str(uuid.uuid4())). Our Trolley
    # hands MyStorage.save a parsed dataset, exactly as dicomtrolley does, and the example's line fails there.
    with pytest.raises(TypeError, match="UUID"):
        trolley.download(
            InstanceReference(BAKER[0].study_uid, BAKER[0].series_uid, BAKER[0].sop_instance_uid), tmp_path
        )


# -------------------------------------------------------------------------------------------------------- caching


def test_caching(server: Servers, tmp_path: Path) -> None:
    a_searcher, a_downloader = QidoRS(requests.Session(), server.dicomweb), WadoURI(requests.Session(), server.wado)

    searcher = CachedSearcher(searcher=a_searcher, cache=DICOMObjectCache(expiry_seconds=300))
    trolley = Trolley(searcher=searcher, downloader=a_downloader)

    first = trolley.find_studies(Query(PatientName="B*"))
    again = trolley.find_studies(Query(PatientName="B*"))
    assert [s.uid for s in again] == [s.uid for s in first] and len(first) == 2
    trolley.download(first[1], tmp_path)
    assert downloaded(tmp_path) == cohort_files(*[i for i in COHORT if i.study_uid == first[1].uid])


# -------------------------------------------------------------------------------------------------------- logging


def test_logging(trolley: Trolley, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logging.basicConfig(level=logging.DEBUG)
    # get the root logger to set specific properties
    root_logger = logging.getLogger("trolley")

    root_logger.setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger="trolley"):
        trolley.download(StudyReference(BROWN[0].study_uid), tmp_path)
    assert any(record.name.startswith("trolley.") for record in caplog.records)


# -------------------------------------------------------------------------------------------- RAD-69 error ignoring


def test_ignoring_rad69_errors(server: Servers) -> None:
    a_searcher = QidoRS(requests.Session(), server.dicomweb)

    trolley = Trolley(
        searcher=a_searcher,
        downloader=Rad69(
            session=requests.session(), url="https://server/rad69", errors_to_ignore=[XDSMissingDocumentError]
        ),
    )
    # trolley.download() # will now skip series raising XDSMissingDocumentError
    assert isinstance(trolley.downloader, Rad69)
    assert XDSMissingDocumentError in list(trolley.downloader.errors_to_ignore)
