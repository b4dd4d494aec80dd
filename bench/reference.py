"""The reference clients: the best one plain process does, written with requests and pynetdicom and nothing of ours.

Each reads the same study-level cohort CSV as ``trolley-tasks export`` and searches it the way the engine must
(QIDO-RS or C-FIND at instance level, one study at a time), inside its timing; the searches run ahead of the
downloads and feed them as they answer. Each writes every instance to a file and returns how many it wrote. What
they leave out, and the engine does not: durable writes (fsync), checking each file before counting it, retries,
a ledger. The bench verifies every file afterwards, outside the timing, for both.

- **WADO-RS**: one request per series, 4 series at once, the multipart answer streamed part by part to files.
- **WADO-URI**: one request per instance on an 8-thread pool of kept-alive sessions.
- **C-GET**: per series, on 4 associations at once (one per thread), the C-STOREs written as they arrive.
- **C-MOVE**: per series, one after the other, into a storage SCP in this process.
"""

from __future__ import annotations

import csv
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

ACCEPT_SERIES = 'multipart/related; type="application/dicom"; transfer-syntax=*'
HEADERS = {"Accept-Encoding": "identity"}
STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
CHUNK = 256 * 1024

logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def read_study_uids(cohort_csv: Path) -> list[str]:
    with open(cohort_csv, newline="") as handle:
        return [row["StudyInstanceUID"] for row in csv.DictReader(handle)]


# -- HTTP --------------------------------------------------------------------------------------------------------------


def _session(local: threading.local) -> requests.Session:
    session: requests.Session | None = getattr(local, "session", None)
    if session is None:
        session = local.session = requests.Session()
        session.headers.update(HEADERS)
    return session


def qido_instances(session: requests.Session, dicomweb: str, study: str) -> dict[str, list[str]]:
    """SeriesInstanceUID -> SOPInstanceUIDs of one study (QIDO-RS, instance level)."""
    response = session.get(
        f"{dicomweb}/studies/{study}/instances",
        headers={"Accept": "application/dicom+json"},
        timeout=60,
    )
    response.raise_for_status()
    series: dict[str, list[str]] = {}
    for item in response.json():
        series.setdefault(item["0020000E"]["Value"][0], []).append(item["00080018"]["Value"][0])
    return series


def _parts(chunks: Iterator[bytes], content_type: str) -> Iterator[Iterator[bytes]]:
    """The bodies of a multipart answer, each as a chunk stream; parts with a Content-Length are streamed, others are
    cut at the boundary."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    buffer = bytearray()
    source = iter(chunks)

    def fill() -> bool:
        chunk = next(source, None)
        if chunk is None:
            return False
        buffer.extend(chunk)
        return True

    while True:
        while (start := buffer.find(delimiter)) < 0 or len(buffer) < start + len(delimiter) + 2:
            if not fill():
                return
        if buffer[start + len(delimiter) : start + len(delimiter) + 2] == b"--":
            return
        while (end := buffer.find(b"\r\n\r\n", start)) < 0:
            if not fill():
                raise ValueError("multipart answer ends inside part headers")
        headers = bytes(buffer[start:end]).lower()
        del buffer[: end + 4]
        length_match = re.search(rb"content-length:\s*(\d+)", headers)

        def body(length: int | None = int(length_match.group(1)) if length_match else None) -> Iterator[bytes]:
            if length is not None:
                left = length
                while left:
                    if not buffer and not fill():
                        raise ValueError("multipart answer ends inside a part")
                    piece = bytes(buffer[:left])
                    del buffer[: len(piece)]
                    left -= len(piece)
                    yield piece
                return
            while (cut := buffer.find(b"\r\n" + delimiter)) < 0:
                if not fill():
                    raise ValueError("multipart answer ends inside a part")
            yield bytes(buffer[:cut])
            del buffer[: cut + 2]

        yield body()


def wado_rs(dicomweb: str, cohort_csv: Path, out: Path, parallel: int = 4) -> int:
    """WADO-RS per series, ``parallel`` series at once; files ``<out>/<series>/<n>.dcm``."""
    local = threading.local()

    def fetch(study: str, series: str, expected: int) -> int:
        response = _session(local).get(
            f"{dicomweb}/studies/{study}/series/{series}", headers={"Accept": ACCEPT_SERIES}, stream=True, timeout=120
        )
        response.raise_for_status()
        folder = out / series
        folder.mkdir(parents=True, exist_ok=True)
        count = 0
        for part in _parts(response.iter_content(CHUNK), response.headers["Content-Type"]):
            with open(folder / f"{count}.dcm", "wb") as handle:
                for chunk in part:
                    handle.write(chunk)
            count += 1
        if count != expected:
            raise RuntimeError(f"series {series}: {count} parts, QIDO-RS said {expected}")
        return count

    search = requests.Session()
    search.headers.update(HEADERS)
    with ThreadPoolExecutor(parallel) as pool:
        futures: list[Future[int]] = []
        for study in read_study_uids(cohort_csv):
            for series, instances in qido_instances(search, dicomweb, study).items():
                futures.append(pool.submit(fetch, study, series, len(instances)))
        return sum(future.result() for future in futures)


def wado_uri(dicomweb: str, wado: str, cohort_csv: Path, out: Path, threads: int = 8) -> int:
    """WADO-URI per instance on ``threads`` kept-alive sessions; files ``<out>/<sop>.dcm``. The query string is
    written by hand so that ``contentType=application/dicom`` keeps its ``/`` (Orthanc 1.10 refuses ``%2F``)."""
    local = threading.local()
    out.mkdir(parents=True, exist_ok=True)

    def fetch(study: str, series: str, sop: str) -> int:
        url = (
            f"{wado}?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}&contentType=application/dicom"
        )
        response = _session(local).get(url, stream=True, timeout=60)
        response.raise_for_status()
        with open(out / f"{sop}.dcm", "wb") as handle:
            for chunk in response.iter_content(CHUNK):
                handle.write(chunk)
        return 1

    search = requests.Session()
    search.headers.update(HEADERS)
    with ThreadPoolExecutor(threads) as pool:
        futures: list[Future[int]] = []
        for study in read_study_uids(cohort_csv):
            for series, instances in qido_instances(search, dicomweb, study).items():
                futures.extend(pool.submit(fetch, study, series, sop) for sop in instances)
        return sum(future.result() for future in futures)


# -- DIMSE -------------------------------------------------------------------------------------------------------------


def c_find_instances(assoc: Any, study: str) -> dict[str, list[str]]:
    """SeriesInstanceUID -> SOPInstanceUIDs of one study (C-FIND, IMAGE level, Study Root)."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = ""
    query.SOPInstanceUID = ""
    series: dict[str, list[str]] = {}
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status is None:
            raise RuntimeError(f"C-FIND of {study}: no answer")
        if status.Status in (0xFF00, 0xFF01) and identifier is not None:
            series.setdefault(str(identifier.SeriesInstanceUID), []).append(str(identifier.SOPInstanceUID))
        elif status.Status != 0x0000:
            raise RuntimeError(f"C-FIND of {study}: status 0x{status.Status:04X}")
    return series


def _series_query(study: str, series: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    return query


def _store_handler(out: Path, received: list[int], lock: threading.Lock) -> Callable[[Any], int]:
    """A C-STORE handler writing each instance, as received, to ``<out>/<sop>.dcm`` (never decoded)."""
    out.mkdir(parents=True, exist_ok=True)

    def handle(event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        with open(out / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as handle:
            handle.write(data)
        with lock:
            received[0] += 1
        return 0x0000

    return handle


def _associate(ae: AE, host: str, port: int, aec: str, **kwargs: Any) -> Any:
    assoc = ae.associate(host, port, ae_title=aec, **kwargs)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {aec}@{host}:{port}")
    return assoc


def c_get(host: str, port: int, aec: str, cohort_csv: Path, out: Path, associations: int = 4) -> int:
    """C-GET per series on ``associations`` associations at once; files ``<out>/<sop>.dcm``."""
    work: queue.Queue[tuple[str, str, int] | None] = queue.Queue()
    received = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def getter() -> None:
        ae = AE(ae_title="BENCHGET")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in STORAGE_CLASSES:
            ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
        roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_CLASSES]
        handlers = [(evt.EVT_C_STORE, _store_handler(out, received, lock))]
        try:
            assoc = _associate(ae, host, port, aec, ext_neg=roles, evt_handlers=handlers)
            try:
                while (item := work.get()) is not None:
                    study, series, expected = item
                    completed = 0
                    for status, _ in assoc.send_c_get(
                        _series_query(study, series), StudyRootQueryRetrieveInformationModelGet
                    ):
                        if status is not None and status.Status == 0x0000:
                            completed = int(getattr(status, "NumberOfCompletedSuboperations", expected) or expected)
                        elif status is None or status.Status not in (0xFF00,):
                            raise RuntimeError(f"C-GET of {series}: {status}")
                    if completed != expected:
                        raise RuntimeError(f"C-GET of {series}: {completed} completed, C-FIND said {expected}")
            finally:
                assoc.release()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            while work.get() is not None:  # drain, so that the search thread never blocks
                pass

    threads = [threading.Thread(target=getter) for _ in range(associations)]
    for thread in threads:
        thread.start()
    finder = AE(ae_title="BENCHFIND")
    finder.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    try:
        assoc = _associate(finder, host, port, aec)
        try:
            for study in read_study_uids(cohort_csv):
                for series, instances in c_find_instances(assoc, study).items():
                    work.put((study, series, len(instances)))
        finally:
            assoc.release()
    finally:
        for _ in threads:
            work.put(None)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return received[0]


def c_move(host: str, port: int, aec: str, destination: str, receiver_port: int, cohort_csv: Path, out: Path) -> int:
    """C-MOVE per series, one after the other, to ``destination`` (a storage SCP of this process on
    ``receiver_port``); files ``<out>/<sop>.dcm``."""
    received = [0]
    lock = threading.Lock()
    scp = AE(ae_title=destination)
    for sop_class in STORAGE_CLASSES:
        scp.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    server = scp.start_server(
        ("127.0.0.1", receiver_port), block=False, evt_handlers=[(evt.EVT_C_STORE, _store_handler(out, received, lock))]
    )
    try:
        ae = AE(ae_title=destination)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = _associate(ae, host, port, aec)
        try:
            for study in read_study_uids(cohort_csv):
                for series, instances in c_find_instances(assoc, study).items():
                    completed = 0
                    responses = assoc.send_c_move(
                        _series_query(study, series), destination, StudyRootQueryRetrieveInformationModelMove
                    )
                    for status, _ in responses:
                        if status is not None and status.Status == 0x0000:
                            completed = int(getattr(status, "NumberOfCompletedSuboperations", 0) or len(instances))
                        elif status is None or status.Status != 0xFF00:
                            raise RuntimeError(f"C-MOVE of {series}: {status}")
                    if completed != len(instances):
                        raise RuntimeError(f"C-MOVE of {series}: {completed} completed, C-FIND said {len(instances)}")
        finally:
            assoc.release()
    finally:
        server.shutdown()
    return received[0]
