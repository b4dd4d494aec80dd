"""One export shared by two "hosts" (network namespaces), each running ``trolley-tasks worker``, against Redis and
the PACS reached by address on the server side: through WADO-URI and WADO-RS (one config for both hosts; one host dies
mid-export), and through C-MOVE (each host its own receiver under its own AE title, registered in Orthanc).

Which host fetched what is read where the PACS sees it. Over HTTP the counting proxy records the client address of
every request, and each host has its own address: WADO-URI names one instance per request, WADO-RS one instance or one
series (``.../series/{uid}``, whose instances that host asked for). Over C-MOVE the PACS sends each move to the
destination the request names, so what a host's receiver got is counted on that host: the connections Orthanc opened
to its receiver port and the bytes that arrived there, in an nftables counter inside its namespace. (The ledger does
not record a host per instance; these are the views a PACS or network administrator would have.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydicom import dcmread

from testbed.cohort import GeneratedCohort, generate_cohort
from testbed.hosts import NftUnavailable
from testbed.orthanc import free_port
from tests.conftest import RunningOrthanc, service_missing
from tests.engine.proxy import PacsProxy
from tests.hosts.conftest import SERVER, Host, worker_in
from trolley_tasks.engine.api import EngineClient
from trolley_tasks.engine.models import JobState, JobStatus
from trolley_tasks.engine.settings import load_settings

pytestmark = pytest.mark.slow

MAX_CONCURRENCY = 3
"""Each host's C-MOVE receiver port: the same number on every host (each namespace has ports of its own)."""
MOVE_COHORT = generate_cohort(studies=4, series=2, instances=4, seed=13)
"""32 instances in 8 series: in batches of 2, 16 C-MOVE requests for the 4 worker processes of the 2 hosts."""


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


@pytest.fixture
def move_pacs(orthanc_factory: Callable[..., RunningOrthanc]) -> RunningOrthanc:
    """An Orthanc of this test's own with MOVE_COHORT: the test registers destinations on it while it runs."""
    return orthanc_factory(MOVE_COHORT)


def write_move_config(path: Path, redis_url: str, pacs: RunningOrthanc, state: Path, port: int) -> Path:
    """The configuration every host shares. Its receiver keys are the submitter's (which validates the profile and
    receives nothing); each host's worker overrides them with its own (:func:`receiver_env`)."""
    path.write_text(f"""
state_dir = "{state}"
[broker]
url = "{redis_url}"
[engine]
sweep_interval = 0.5
[sources.pacs]
searcher = "dicom-qr"
downloader = "c-move"
host = "{SERVER}"
port = {pacs.dicom_port}
called_aet = "{pacs.aet}"
calling_aet = "TROLLEY"
move_destination = "TROLLEY"
receiver_host = "127.0.0.1"
receiver_port = {port}
max_concurrency = 4
""")
    return path


def receiver_env(aet: str, host: Host, spool: Path, port: int) -> dict[str, str]:
    """One host's C-MOVE settings as ``TROLLEY_SOURCES__PACS__*`` overrides: its own AE title (as destination and as
    caller), its own address and port for the receiver, its own spool."""
    keys = {
        "MOVE_DESTINATION": aet,
        "CALLING_AET": aet,
        "RECEIVER_HOST": host.address,
        "RECEIVER_PORT": str(port),
        "SPOOL_DIR": str(spool),
    }
    return {f"TROLLEY_SOURCES__PACS__{key}": value for key, value in keys.items()}


def wait_for_line(log: Path, line: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while line.encode() not in log.read_bytes():
        assert time.monotonic() < deadline, f"no {line!r} in {log.name}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def test_two_hosts_each_receive_their_c_moves(  # type: ignore[no-untyped-def]
    hosts: list[Host], broker: str, move_pacs: RunningOrthanc, tmp_path: Path
) -> None:
    cohort = move_pacs.cohort
    port = free_port()  # fresh per run: no receiver of an earlier test or run can hold it in any namespace
    config = write_move_config(tmp_path / "trolley.toml", broker, move_pacs, tmp_path / "state", port)
    out = tmp_path / "out"
    aets = {host.name: f"TROLLEY-{host.name.removeprefix('trolley-').upper()}" for host in hosts}
    spools = {host.name: tmp_path / f"spool-{host.name}" for host in hosts}
    with ExitStack() as stack:
        for host in hosts:
            aet = aets[host.name]
            move_pacs.set_modality(aet, aet, port, host=host.address)  # PUT /modalities/TROLLEY-H1
            stack.callback(move_pacs.delete_modality, aet)
            try:
                host.count_tcp_to(port)
            except NftUnavailable as exc:
                service_missing(str(exc))
            stack.callback(host.stop_counting)
            log = tmp_path / f"{host.name}.log"
            stack.enter_context(worker_in(host, config, log, env=receiver_env(aet, host, spools[host.name], port)))
            wait_for_line(log, f"C-MOVE receiver of pacs listening on {host.address}:{port}")
        engine = stack.enter_context(_engine(config))
        job = engine.submit(cohort.study_refs(), source="pacs", output=out, batch_size=2)
        status = _wait(engine, job, timeout=180)
        received = {host.name: host.tcp_counts() for host in hosts}
        registered = set(move_pacs.modality_names())
    assert {aets[host.name] for host in hosts} <= registered, registered
    assert not set(aets.values()) & set(move_pacs.modality_names())  # removed by name at the end

    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (len(cohort), len(cohort), 0), status
    for item in cohort:  # every instance verified: a DICOM file that parses, the right instance, its pixels
        dataset = dcmread(out / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm")
        assert dataset.SOPInstanceUID == item.sop_instance_uid
        assert dataset.PixelData == cohort.dataset(item).PixelData
    assert len([p for p in out.rglob("*.dcm") if ".trolley" not in p.parts]) == len(cohort)
    for spool in spools.values():  # every arrival was claimed by the host it was sent to; nothing left behind
        # nothing left but the receiver's (empty) registry of outstanding moves (transports/move_spool.py)
        assert [p.name for p in spool.iterdir() if p.name != "expected"] == [], spool
        assert not (spool / "expected").exists() or list((spool / "expected").iterdir()) == [], spool

    pixels = [len(cohort.dataset(item).PixelData) for item in cohort]
    for name, (connections, traffic) in received.items():  # both hosts' receivers received a share from the PACS
        assert connections >= 1 and traffic >= min(pixels), (name, received)
    assert sum(traffic for _, traffic in received.values()) >= sum(pixels), received
    moves = len({item.series_uid for item in cohort}) * 2  # 4 instances a series, in batches of 2
    assert sum(connections for connections, _ in received.values()) >= moves, received  # one association a move
    shares = {
        name: f"{connections} associations, {traffic / 1e6:.1f} MB" for name, (connections, traffic) in received.items()
    }
    print(f"\nc-move: {status.done} instances; received per host {shares}; destinations {sorted(aets.values())}")


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
