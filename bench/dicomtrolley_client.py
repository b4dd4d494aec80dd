"""dicomtrolley 4.1.0 exporting the study-level cohort CSV, as its README shows: run by the bench with the Python of
``.bench/venv-dicomtrolley`` (never ours: this file imports only the standard library, requests and dicomtrolley).

    python bench/dicomtrolley_client.py wado-rs|wado-uri DICOMWEB_URL WADO_URL COHORT.csv OUT

A ``Trolley`` with ``QidoRS`` as searcher and ``WadoRS`` (or ``WadoURI``) as downloader downloads every study of the
CSV into OUT (its ``StorageDir``: ``study/series/instance`` with underscores). ``Trolley.download`` in 4.1.0 takes
``use_async`` and ``max_workers`` but does not use them: it is sequential, one series (WADO-RS) or instance (WADO-URI)
at a time, after one QIDO-RS search per study. Prints one JSON line: seconds, instances written, or the error.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path


def main() -> None:
    protocol, dicomweb, wado, cohort_csv, out = sys.argv[1:6]
    import requests
    from dicomtrolley.core import StudyReference
    from dicomtrolley.qido_rs import QidoRS
    from dicomtrolley.trolley import Trolley
    from dicomtrolley.wado_rs import WadoRS
    from dicomtrolley.wado_uri import WadoURI

    started = time.perf_counter()
    result: dict[str, object] = {"protocol": protocol}
    try:
        with open(cohort_csv, newline="") as handle:
            studies = [StudyReference(study_uid=row["StudyInstanceUID"]) for row in csv.DictReader(handle)]
        session = requests.Session()
        downloader = WadoRS(session, dicomweb) if protocol == "wado-rs" else WadoURI(session, wado)
        trolley = Trolley(downloader=downloader, searcher=QidoRS(session, dicomweb))
        trolley.download(studies, output_dir=out)
        result["ok"] = True
    except Exception as exc:  # reported, not hidden: the bench prints it
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    result["seconds"] = time.perf_counter() - started
    result["written"] = sum(1 for p in Path(out).rglob("*") if p.is_file())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
