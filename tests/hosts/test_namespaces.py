"""One export shared by two "hosts" (network namespaces), each running ``trolley-tasks worker``, against Redis and
the PACS reached by address on the server side: through WADO-URI and WADO-RS (one config for both hosts; one host dies
mid-export).

Which host fetched what is read where the PACS sees it. Over HTTP the counting proxy records the client address of
every request, and each host has its own address: WADO-URI names one instance per request, WADO-RS one instance or one
series (``.../series/{uid}``, whose instances that host asked for). (The ledger does not record a host per instance;
this is the view a PACS administrator would have.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from testbed.cohort import GeneratedCohort
from tests.engine.proxy import PacsProxy
from tests.hosts.conftest import SERVER, Host, worker_in
from trolley_tasks.engine.api import EngineClient
from trolley_tasks.engine.models import JobState, JobStatus
from trolley_tasks.engine.settings import load_settings

pytestmark = pytest.mark.slow

MAX_CONCURRENCY = 3


@pytest.fixture
def server_proxy(orthanc) -> Iterator[PacsProxy]:  # type: ignore[no-untyped-def]
    """The counting proxy in front of the session Orthanc, listening on the bridge address (the server side)."""
    proxy = PacsProxy(orthanc.url, host=SERVER).start()
    yield proxy
    proxy.stop()


def write_config(path: Path, redis_url: str, proxy: PacsProxy, state: Path, downloader: str) -> Path:
    path.write_text(f"""
state_dir = "{state}"
[broker]
url = "{redis_url}"
[engine]
sweep_interval = 0.5
lease_seconds = 3
stall_seconds = 2
[sources.pacs]
downloader = "{downloader}"
url = "{proxy.url}/dicom-web"
wado_uri_url = "{proxy.url}/wado"
max_concurrency = {MAX_CONCURRENCY}
""")
    return path


def fetched_by(proxy: PacsProxy, cohort: GeneratedCohort) -> dict[str, set[str]]:
    """SOPInstanceUIDs per client address, from the proxy's retrieve requests (WADO-URI, WADO-RS); searches
    (QIDO-RS: ``studies``, ``studies/{st}/series``, ``.../series/{se}/instances``) are not fetches."""
    in_series: dict[str, set[str]] = {}
    for item in cohort:
        in_series.setdefault(item.series_uid, set()).add(item.sop_instance_uid)
    shares: dict[str, set[str]] = {}
    for client, path in list(proxy.clients):
        url = urlsplit(path)
        query = parse_qs(url.query)
        parts = url.path.split("/")
        tail = parts[parts.index("studies") :] if "studies" in parts else []
        if url.path.endswith("/wado") and "objectUID" in query:
            uids = {query["objectUID"][0]}
        elif len(tail) == 6 and tail[2] == "series" and tail[4] == "instances":  # WADO-RS, one instance
            uids = {tail[5]}
        elif len(tail) == 4 and tail[2] == "series":  # WADO-RS, a series
            uids = in_series.get(tail[3], set())
        else:
            continue
        shares.setdefault(client, set()).update(uids)
    return shares


@pytest.mark.parametrize("downloader", ["wado-uri", "wado-rs"])
def test_two_hosts_share_an_export_and_one_dies(  # type: ignore[no-untyped-def]
    downloader: str, hosts: list[Host], broker: str, server_proxy: PacsProxy, orthanc, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "trolley.toml", broker, server_proxy, tmp_path / "state", downloader)
    server_proxy.delay = 0.15  # every request pays a little: batches are in flight on both hosts
    first, second = hosts
    out = tmp_path / "out"

    def fetched() -> dict[str, set[str]]:
        return fetched_by(server_proxy, orthanc.cohort)

    with ExitStack() as stack:
        for host in hosts:
            stack.enter_context(worker_in(host, config, tmp_path / f"{host.name}.log"))
        engine = stack.enter_context(_engine(config))
        job = engine.submit(orthanc.cohort.study_refs(), source="pacs", output=out, batch_size=2)

        deadline = time.monotonic() + 120
        while not ({first.address, second.address} <= set(fetched()) and engine.status(job).done >= 4):
            assert time.monotonic() < deadline, f"both hosts did not start fetching: {fetched()}"
            assert not engine.status(job).state.ended, "the export ended before both hosts fetched"
            time.sleep(0.05)
        before = {client: len(uids) for client, uids in fetched().items()}
        killed = first.kill_all()
        requests_at_kill = len(server_proxy.clients)

        status = _wait(engine, job, timeout=180)

    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (18, 18, 0), status
    for item in orthanc.cohort:  # every instance verified: on disk once, byte-identical to what was uploaded
        path = out / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm"
        assert path.read_bytes() == orthanc.cohort.encode(item)
    assert len([p for p in out.rglob("*.dcm") if ".trolley" not in p.parts]) == 18

    shares = fetched()
    assert set(shares) == {first.address, second.address}, shares  # nobody else, and no loopback short cut
    assert before[first.address] >= 1 and before[second.address] >= 1, before
    assert shares[first.address] | shares[second.address] == {item.sop_instance_uid for item in orthanc.cohort}
    after_kill = {client for client, _ in server_proxy.clients[requests_at_kill:]}
    assert after_kill == {second.address}, after_kill  # the dead host asked nothing more; the live one finished
    assert 2 <= server_proxy.max_in_flight <= MAX_CONCURRENCY, server_proxy.max_in_flight
    print(
        f"\n{downloader}: shares before the kill {before}; killed {first.name} pids {killed}; final shares "
        f"{ {client: len(uids) for client, uids in shares.items()} }; max in flight {server_proxy.max_in_flight}"
    )


@contextmanager
def _engine(config: Path) -> Iterator[EngineClient]:
    engine = EngineClient(load_settings(config))
    try:
        yield engine
    finally:
        engine.close()


def _wait(engine: EngineClient, job: str, timeout: float) -> JobStatus:
    deadline = time.monotonic() + timeout
    while not (status := engine.status(job)).state.ended:
        assert time.monotonic() < deadline, f"job {job} did not end in {timeout}s: {status}"
        time.sleep(0.2)
    return status
