"""One WADO export shared by two "hosts" (network namespaces), each running ``trolley-tasks worker`` with the same
configuration, against Redis and the PACS reached by address on the server side; one host dies mid-export.

Which host fetched what is read where the PACS sees it: the counting proxy records the client address of every
request, and each host has its own address. (The ledger does not record a host per instance; the proxy's view is
the one a PACS administrator would have.) WADO-URI makes one request per instance, so each instance is attributed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

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


def write_config(path: Path, redis_url: str, proxy: PacsProxy, state: Path) -> Path:
    path.write_text(f"""
state_dir = "{state}"
[broker]
url = "{redis_url}"
[engine]
sweep_interval = 0.5
lease_seconds = 3
stall_seconds = 2
[sources.pacs]
downloader = "wado-uri"
url = "{proxy.url}/dicom-web"
wado_uri_url = "{proxy.url}/wado"
max_concurrency = {MAX_CONCURRENCY}
""")
    return path


def fetched_by(proxy: PacsProxy) -> dict[str, set[str]]:
    """SOPInstanceUIDs per client address, from the proxy's WADO-URI requests."""
    shares: dict[str, set[str]] = {}
    for client, path in list(proxy.clients):
        query = parse_qs(urlsplit(path).query)
        if urlsplit(path).path.endswith("/wado") and "objectUID" in query:
            shares.setdefault(client, set()).add(query["objectUID"][0])
    return shares


def test_two_hosts_share_an_export_and_one_dies(  # type: ignore[no-untyped-def]
    hosts: list[Host], server_redis: str, server_proxy: PacsProxy, orthanc, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "trolley.toml", server_redis, server_proxy, tmp_path / "state")
    server_proxy.delay = 0.15  # every request pays a little: batches are in flight on both hosts
    first, second = hosts
    out = tmp_path / "out"
    with ExitStack() as stack:
        for host in hosts:
            stack.enter_context(worker_in(host, config, tmp_path / f"{host.name}.log"))
        engine = stack.enter_context(_engine(config))
        job = engine.submit(orthanc.cohort.study_refs(), source="pacs", output=out, batch_size=2)

        deadline = time.monotonic() + 120
        while not ({first.address, second.address} <= set(fetched_by(server_proxy)) and engine.status(job).done >= 4):
            assert time.monotonic() < deadline, f"both hosts did not start fetching: {fetched_by(server_proxy)}"
            assert not engine.status(job).state.ended, "the export ended before both hosts fetched"
            time.sleep(0.05)
        before = {client: len(uids) for client, uids in fetched_by(server_proxy).items()}
        killed = first.kill_all()
        requests_at_kill = len(server_proxy.clients)

        status = _wait(engine, job, timeout=180)

    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (18, 18, 0), status
    for item in orthanc.cohort:  # every instance verified: on disk once, byte-identical to what was uploaded
        path = out / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm"
        assert path.read_bytes() == orthanc.cohort.encode(item)
    assert len([p for p in out.rglob("*.dcm") if ".trolley" not in p.parts]) == 18

    shares = fetched_by(server_proxy)
    assert set(shares) == {first.address, second.address}, shares  # nobody else, and no loopback short cut
    assert before[first.address] >= 1 and before[second.address] >= 1, before
    assert shares[first.address] | shares[second.address] == {item.sop_instance_uid for item in orthanc.cohort}
    after_kill = {client for client, _ in server_proxy.clients[requests_at_kill:]}
    assert after_kill == {second.address}, after_kill  # the dead host asked nothing more; the live one finished
    assert 2 <= server_proxy.max_in_flight <= MAX_CONCURRENCY, server_proxy.max_in_flight
    print(
        f"\nshares before the kill {before}; killed {first.name} pids {killed}; final shares "
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
