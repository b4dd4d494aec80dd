"""Micro-benchmark: the CPU an instance-level expansion costs, without the network.

    .venv/bin/python -m bench.qido_expansion [--repeat N]

It starts a throwaway Orthanc, loads one generated study (2 series x 50 CT instances), and keeps the three QIDO-RS
answers ``QidoRS.find_study_by_id(uid, INSTANCE)`` asks for (the study with its counts, the series listing, the
relational ``/studies/{uid}/instances``). It then stops Orthanc and times the searcher on those answers, served from
memory by a requests adapter, so that only JSON decoding and tree building are measured. In the same run it times
pydicom's ``Dataset.from_json`` on the instances' answer, the path the searcher took before (the ratio between the
two is what counts on a shared machine; absolute figures move).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset
from requests.adapters import BaseAdapter

from testbed.cohort import generate_cohort
from testbed.orthanc import OrthancServer
from trolley_tasks.core import QueryLevels
from trolley_tasks.formats.dicom_json import _keep_bulk_data_empty, datasets_from_json
from trolley_tasks.searchers.qido_rs import QidoRS

DICOM_JSON = {"Accept": "application/dicom+json"}


def capture(series: int = 2, instances: int = 50) -> tuple[str, dict[str, bytes]]:
    """One study's three QIDO-RS answers, as Orthanc sends them."""
    cohort = generate_cohort(1, series, instances, seed=12)
    study = cohort.study_refs()[0].study_uid
    with tempfile.TemporaryDirectory(prefix="trolley-qido-") as folder, OrthancServer(Path(folder)) as pacs:
        pacs.load_cohort(cohort)
        base = pacs.dicomweb_url
        urls = {
            "study": f"{base}/studies?StudyInstanceUID={study}&includefield=NumberOfStudyRelatedSeries"
            "&includefield=NumberOfStudyRelatedInstances",
            "series": f"{base}/studies/{study}/series?includefield=NumberOfSeriesRelatedInstances",
            "instances": f"{base}/studies/{study}/instances",
        }
        answers = {}
        for name, url in urls.items():
            response = requests.get(url, headers=DICOM_JSON, timeout=30)
            response.raise_for_status()
            answers[name] = response.content
    return study, answers


class CannedAnswers(BaseAdapter):
    """Answers each QIDO-RS GET from memory: the listing of series, the instances, or else the study."""

    def __init__(self, answers: Mapping[str, bytes]) -> None:
        super().__init__()
        self.answers = answers

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        path = (request.path_url or "").split("?")[0]
        name = "instances" if path.endswith("/instances") else "series" if path.endswith("/series") else "study"
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "application/dicom+json"
        response.raw = io.BytesIO(self.answers[name])
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        """Nothing to close."""


def timed(call: Callable[[], object], repeat: int) -> float:
    """The median seconds of ``repeat`` calls, after one untimed call."""
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    options = parser.parse_args(argv)
    study_uid, answers = capture()
    session = requests.Session()
    session.mount("http://", CannedAnswers(answers))
    searcher = QidoRS(session, "http://pacs/dicom-web")
    study = searcher.find_study_by_id(study_uid, QueryLevels.INSTANCE)
    count = len(study.all_instances())
    objects = json.loads(answers["instances"])

    def pydicom_from_json() -> list[Dataset]:
        return [Dataset.from_json(obj, bulk_data_uri_handler=_keep_bulk_data_empty) for obj in objects]

    repeat = options.repeat
    rows = [
        (
            "QidoRS.find_study_by_id(uid, INSTANCE)",
            timed(lambda: searcher.find_study_by_id(study_uid, "INSTANCE"), repeat),
        ),
        ("datasets_from_json(instances answer)", timed(lambda: datasets_from_json(answers["instances"]), repeat)),
        ("pydicom Dataset.from_json, same objects", timed(pydicom_from_json, repeat)),
        ("json.loads(instances answer)", timed(lambda: json.loads(answers["instances"]), repeat)),
    ]
    size = len(answers["instances"]) / 1000
    print(f"one study, {count} instances, instances answer {size:.0f} kB; median of {repeat}")
    for label, seconds in rows:
        print(f"  {label:42s} {seconds * 1000:8.2f} ms  {seconds * 1e6 / count:8.1f} us an instance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
