"""Load a generated cohort into a running Orthanc over its REST API: the compose file's one-shot ``cohort`` service.

    python -m testbed.load --url http://orthanc:8042 --studies 3 --series 2 --instances 10

It waits for Orthanc to answer (compose starts services together), uploads, prints the count and exits; running it
again uploads the same instances again, which Orthanc keeps once (same SOPInstanceUIDs, same seed).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from testbed.cohort import generate_cohort


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(f"{url}/system", timeout=5).raise_for_status()
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://orthanc:8042")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--wait", type=float, default=120, help="Seconds to wait for Orthanc to answer.")
    options = parser.parse_args()
    wait_for(options.url, options.wait)
    cohort = generate_cohort(
        studies=options.studies, series=options.series, instances=options.instances, seed=options.seed
    )
    session = requests.Session()

    def upload(payload: bytes) -> None:
        session.post(f"{options.url}/instances", data=payload, timeout=60).raise_for_status()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, (cohort.encode(item) for item in cohort)))
    print(f"loaded {len(cohort)} instances of {options.studies} studies into {options.url}")


if __name__ == "__main__":
    main()
