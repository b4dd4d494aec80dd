"""``make bench``: trolley-tasks against the best plain client, dicomtrolley 4.1.0, and itself at scale, on one
throwaway Orthanc, in one run, side by side (see docs/performance.md for what each figure means).

    make bench                      # the full size: 1,000 instances, every protocol, about 10 minutes
    make bench BENCH_SIZE=smoke     # about 100 instances, a few protocols: a couple of minutes (CI)

Writes ``bench/results/<date>.json`` (``<date>-smoke.json``), prints the tables, and with the full size rewrites the
generated part of docs/performance.md. The machine is shared: absolute figures move with whatever else runs, so only
ratios of runs taken in one bench run count; each ratio's two runs run back to back, and the load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import requests

from bench import engine_runs, reference
from bench.engine_runs import EngineRun, cpu_of
from bench.profile import Profiler, summarise
from bench.relay import Relay
from bench.verify import Catalogue, encode_all, pseudonymous, verify
from testbed import hosts as nshosts
from testbed.cohort import GeneratedCohort, generate_cohort
from testbed.memory_probe import run_probe
from testbed.orthanc import OrthancServer, free_port
from testbed.redis_server import redis_server
from trolley_tasks.deid import BUILT_IN, Deidentifier

DICOMTROLLEY = "dicomtrolley==4.1.0"
DICOMTROLLEY_VENV = Path(".bench/venv-dicomtrolley")
RESULTS = Path("bench/results")
PERFORMANCE_DOC = Path("docs/performance.md")
BEGIN, END = "<!-- bench:begin (written by make bench; edit outside) -->", "<!-- bench:end -->"
PROTOCOLS = ("wado-rs", "wado-uri", "c-get", "c-move")
DEID_KEY = "the bench's de-identification key"
"""A throwaway key for the de-identified run (its pseudonyms are checked against it, then deleted with the output)."""
MB = 1_000_000


@dataclass(frozen=True)
class Size:
    name: str
    cohort: tuple[int, int, int]
    """studies x series x instances of 512x512 CT (526 KB each)."""
    protocols: tuple[str, ...]
    broker_protocols: tuple[str, ...]
    far_protocols: tuple[str, ...]
    dicomtrolley: bool
    scaling: tuple[int, ...]
    hosts: bool
    probe: tuple[int, int, int]
    large: tuple[int, int, int]
    """The large study: series x instances x rows (= columns) of one study."""
    profile: bool


SIZES = {
    "full": Size(
        name="full",
        cohort=(10, 2, 50),
        protocols=PROTOCOLS,
        broker_protocols=PROTOCOLS,
        far_protocols=("wado-rs", "c-get"),
        dicomtrolley=True,
        scaling=(1, 2, 4),
        hosts=True,
        probe=(100, 10, 100),
        large=(4, 250, 724),
        profile=True,
    ),
    "smoke": Size(
        name="smoke",
        cohort=(2, 2, 25),
        protocols=("wado-rs", "wado-uri", "c-get"),
        broker_protocols=("wado-rs",),
        far_protocols=("wado-rs",),
        dicomtrolley=False,
        scaling=(),
        hosts=False,
        probe=(10, 10, 50),
        large=(1, 40, 512),
        profile=False,
    ),
}


def say(text: str) -> None:
    print(text, flush=True)


def load_now() -> float:
    return os.getloadavg()[0]


def machine_busy() -> float:
    """CPU-seconds every core of the machine spent busy so far (all processes, ours and others')."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class Bench:
    def __init__(self, size: Size, root: Path, results_dir: Path) -> None:
        self.size = size
        self.root = root
        self.results_dir = results_dir
        self.runs: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.stack = ExitStack()
        self.ref_move_port = free_port()
        self.engine_move_port = free_port()

    # -- set-up ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        studies, series, instances = self.size.cohort
        self.cohort = generate_cohort(studies, series, instances, seed=12)
        self.pacs = OrthancServer(
            self.root / "orthanc",
            modalities={"BENCHREF": ("BENCHREF", self.ref_move_port), "TROLLEY": ("TROLLEY", self.engine_move_port)},
        )
        self.pacs.start()
        self.stack.callback(self.pacs.stop)
        assert self.pacs.process is not None
        self.pacs_pid = self.pacs.process.pid
        self.catalogue = self.load(self.cohort)
        self.cohort_csv = self.write_csv(self.root / "cohort.csv", self.cohort)
        http = Relay(("127.0.0.1", self.pacs.http_port)).start()
        self.stack.callback(http.stop)
        dimse = Relay(("127.0.0.1", self.pacs.dicom_port)).start()
        self.stack.callback(dimse.stop)
        self.relays = {"http": http, "dimse": dimse}

    def load(self, cohort: GeneratedCohort) -> Catalogue:
        catalogue = Catalogue()
        started = time.perf_counter()
        count = self.pacs.upload(encode_all(cohort, catalogue), threads=4)
        seconds = time.perf_counter() - started
        say(f"loaded {count} instances ({catalogue.total_bytes / MB:.0f} MB) into Orthanc in {seconds:.0f} s")
        return catalogue

    @staticmethod
    def write_csv(path: Path, cohort: GeneratedCohort) -> Path:
        path.write_text("StudyInstanceUID\n" + "".join(f"{ref.study_uid}\n" for ref in cohort.study_refs()))
        return path

    def endpoints(self, far: bool) -> dict[str, Any]:
        """Where the PACS is: directly, or through the delaying relays."""
        http_port = self.relays["http"].port if far else self.pacs.http_port
        base = f"http://127.0.0.1:{http_port}"
        return {
            "dicomweb": f"{base}/dicom-web",
            "wado": f"{base}/wado",
            "dimse_port": self.relays["dimse"].port if far else self.pacs.dicom_port,
        }

    def sources(self) -> dict[str, dict[str, Any]]:
        """One trolley-tasks source profile per protocol and network."""
        tables: dict[str, dict[str, Any]] = {}
        for far in (False, True):
            where = self.endpoints(far)
            suffix = "_far" if far else ""
            dimse = {
                "searcher": "dicom-qr",
                "host": "127.0.0.1",
                "port": where["dimse_port"],
                "called_aet": "ORTHANC",
                "calling_aet": "TROLLEY",
                "max_concurrency": 8,
            }
            tables[f"wadors{suffix}"] = {"downloader": "wado-rs", "url": where["dicomweb"], "max_concurrency": 8}
            tables[f"wadouri{suffix}"] = {
                "downloader": "wado-uri",
                "url": where["dicomweb"],
                "wado_uri_url": where["wado"],
                "max_concurrency": 8,
            }
            tables[f"cget{suffix}"] = {**dimse, "downloader": "c-get"}
            if not far:
                tables["cmove"] = {
                    **dimse,
                    "downloader": "c-move",
                    "move_destination": "TROLLEY",
                    "receiver_host": "127.0.0.1",
                    "receiver_port": self.engine_move_port,
                }
        return tables

    @staticmethod
    def source_name(protocol: str, far: bool) -> str:
        return protocol.replace("-", "") + ("_far" if far else "")

    # -- recording ---------------------------------------------------------------------------------------------------

    @contextmanager
    def measured(self, name: str) -> Iterator[dict[str, Any]]:
        """A run's record, with the load around it and the machine's busy CPU-seconds during it."""
        record: dict[str, Any] = {"name": name, "load_1min": round(load_now(), 2)}
        busy, relay_cpu = machine_busy(), cpu_of([relay.pid for relay in self.relays.values()])
        yield record
        record["machine_busy_cpu_seconds"] = round(machine_busy() - busy, 2)
        record["relay_cpu_seconds"] = round(cpu_of([relay.pid for relay in self.relays.values()]) - relay_cpu, 2)

    def finish(self, record: dict[str, Any], out: Path, catalogue: Catalogue, seconds: float) -> dict[str, Any]:
        verdict = verify(out, catalogue)
        instances = len(catalogue.instances)
        record.update(
            seconds=round(seconds, 3),
            instances=instances,
            inst_per_s=round(instances / seconds, 1) if seconds else None,
            mb_per_s=round(catalogue.total_bytes / MB / seconds, 1) if seconds else None,
            verified=verdict.as_dict(),
        )
        if "wall_seconds" in record:
            record["wall_inst_per_s"] = round(instances / record["wall_seconds"], 1)
        shutil.rmtree(out, ignore_errors=True)
        self.runs.append(record)
        mark = "ok" if verdict.ok else "FAILED"
        wall = f" (wall {record['wall_seconds']:.1f} s)" if "wall_seconds" in record else ""
        say(
            f"  {record['name']:44s} {record['inst_per_s'] or 0:7.1f} inst/s {record['mb_per_s'] or 0:6.1f} MB/s "
            f"{seconds:6.2f} s{wall}  verify {mark}: {verdict.summary()}"
        )
        return record

    # -- the runs ----------------------------------------------------------------------------------------------------

    def reference_run(self, protocol: str, far: bool = False) -> dict[str, Any]:
        where = self.endpoints(far)
        out = self.root / "out" / f"ref-{protocol}-{far}"
        clients: dict[str, Callable[[], int]] = {
            "wado-rs": lambda: reference.wado_rs(where["dicomweb"], self.cohort_csv, out),
            "wado-uri": lambda: reference.wado_uri(where["dicomweb"], where["wado"], self.cohort_csv, out),
            "c-get": lambda: reference.c_get("127.0.0.1", where["dimse_port"], "ORTHANC", self.cohort_csv, out),
            "c-move": lambda: reference.c_move(
                "127.0.0.1", where["dimse_port"], "ORTHANC", "BENCHREF", self.ref_move_port, self.cohort_csv, out
            ),
        }
        label = f"reference {protocol}" + (" 10 ms" if far else "")
        with self.measured(label) as record:
            me = psutil.Process()
            cpu, pacs = sum(me.cpu_times()[:2]), cpu_of([self.pacs_pid])
            started = time.perf_counter()
            written = clients[protocol]()
            seconds = time.perf_counter() - started
            record.update(
                kind="reference",
                protocol=protocol,
                network="10 ms" if far else "loopback",
                written=written,
                cpu_seconds=round(sum(me.cpu_times()[:2]) - cpu, 3),
                pacs_cpu_seconds=round(cpu_of([self.pacs_pid]) - pacs, 3),
            )
        return self.finish(record, out, self.catalogue, seconds)

    def engine_record(self, record: dict[str, Any], run: EngineRun, protocol: str, far: bool) -> None:
        record.update(
            kind="trolley-tasks",
            protocol=protocol,
            network="10 ms" if far else "loopback",
            mode=run.mode,
            workers=run.workers,
            wall_seconds=round(run.wall_seconds, 3),
            job_seconds=round(run.job_seconds, 3),
            counts=run.counts,
            cpu_seconds=round(run.cpu_seconds, 3),
            command_cpu_seconds=round(run.command_cpu_seconds, 3),
            peak_rss_mb={role: round(value / 2**20, 1) for role, value in run.peak_rss.items()},
            pacs_cpu_seconds=round(run.pacs_cpu_seconds, 3),
            notes=run.notes,
        )
        if run.submit_to_done_seconds is not None:
            record["submit_to_done_seconds"] = round(run.submit_to_done_seconds, 3)

    def embedded_run(
        self,
        protocol: str,
        far: bool = False,
        workers: int = 2,
        cohort_csv: Path | None = None,
        label: str = "",
        deid: bool = False,
    ) -> dict[str, Any]:
        name = f"{protocol}-{far}-{workers}-{len(self.runs)}"
        out = self.root / "out" / f"tt-{name}"
        config = engine_runs.write_config(self.root / f"{name}.toml", self.root / "state" / name, self.sources())
        what = f"trolley-tasks {protocol}" + (" --deid basic" if deid else "") + (" 10 ms" if far else "")
        label = label or f"{what}, embedded, {workers} workers"
        catalogue = self.catalogue if cohort_csv is None else self.large
        with self.measured(label) as record:
            run = engine_runs.run_embedded(
                config,
                cohort_csv or self.cohort_csv,
                self.source_name(protocol, far),
                out,
                workers,
                self.root / f"{name}.log",
                self.pacs_pid,
                deid_key=DEID_KEY if deid else "",
            )
            self.engine_record(record, run, protocol, far)
            if deid:
                record["deid"] = "basic"
                catalogue = pseudonymous(catalogue, Deidentifier(BUILT_IN["basic"], DEID_KEY.encode()))
        shutil.rmtree(self.root / "state" / name, ignore_errors=True)
        return self.finish(record, out, catalogue, run.job_seconds)

    def dicomtrolley_run(self, protocol: str, far: bool = False) -> dict[str, Any]:
        python = ensure_dicomtrolley()
        where = self.endpoints(far)
        out = self.root / "out" / f"dt-{protocol}-{far}"
        command = [
            str(python), "bench/dicomtrolley_client.py", protocol, where["dicomweb"], where["wado"],
            str(self.cohort_csv), str(out),
        ]  # fmt: skip
        with self.measured(f"dicomtrolley 4.1.0 {protocol}" + (" 10 ms" if far else "")) as record:
            cpu = engine_runs.children_cpu()
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - started
            try:
                answer = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                answer = {"ok": False, "error": f"exit {done.returncode}: {done.stderr[-500:]}", "seconds": wall}
            record.update(
                kind="dicomtrolley",
                protocol=protocol,
                network="10 ms" if far else "loopback",
                wall_seconds=round(wall, 3),
                cpu_seconds=round(engine_runs.children_cpu() - cpu, 3),
                ok=answer.get("ok", False),
                error=re.sub(r"\d+(\.\d+){5,}", "<uid>", answer.get("error") or "")[:400] or None,
                error_full=answer.get("error"),
            )
        if not record["ok"]:
            shutil.rmtree(out, ignore_errors=True)
            record.update(seconds=round(answer["seconds"], 3), instances=0, inst_per_s=None, mb_per_s=None)
            self.runs.append(record)
            say(f"  {record['name']:44s} FAILED after {answer['seconds']:.1f} s: {record['error']}")
            return record
        return self.finish(record, out, self.catalogue, float(answer["seconds"]))

    def broker_runs(self, protocols: tuple[str, ...]) -> None:
        """A plain redis-server; per protocol, 2 workers started beforehand (fresh ones: an association a worker keeps
        open from an earlier protocol would run on during this one), the reference again, then the export."""
        say("trolley-tasks on a plain redis-server with 2 workers started beforehand (each after its own reference):")
        with redis_server(self.root / "redis-broker") as (url, redis_process):
            config = engine_runs.write_config(
                self.root / "broker.toml", self.root / "state" / "broker", self.sources(), broker=url
            )
            for protocol in protocols:
                logs = self.root / f"broker-logs-{protocol}"
                with engine_runs.started_workers(config, [[], []], logs) as workers:
                    self.reference_run(protocol)
                    out = self.root / "out" / f"broker-{protocol}"
                    with self.measured(f"trolley-tasks {protocol}, redis-server, 2 workers") as record:
                        run = engine_runs.run_on_broker(
                            config,
                            self.cohort_csv,
                            self.source_name(protocol, False),
                            out,
                            workers,
                            redis_process,
                            self.root / f"broker-{protocol}.log",
                            self.pacs_pid,
                        )
                        self.engine_record(record, run, protocol, False)
                    self.finish(record, out, self.catalogue, run.job_seconds)

    # -- the 10 ms check ---------------------------------------------------------------------------------------------

    def relay_check(self) -> dict[str, Any]:
        def timings(url: str, fresh: bool) -> float:
            session = requests.Session()
            values = []
            for _ in range(15):
                if fresh:
                    session.close()
                    session = requests.Session()
                started = time.perf_counter()
                session.get(url, timeout=10).raise_for_status()
                values.append(1000 * (time.perf_counter() - started))
            session.close()
            return statistics.median(values[2:] if not fresh else values)

        direct = f"{self.pacs.url}/system"
        relayed = f"http://127.0.0.1:{self.relays['http'].port}/system"
        check = {
            "kept_alive_direct_ms": timings(direct, False),
            "kept_alive_relayed_ms": timings(relayed, False),
            "new_connection_direct_ms": timings(direct, True),
            "new_connection_relayed_ms": timings(relayed, True),
        }
        check = {key: round(value, 2) for key, value in check.items()}
        say(
            "relay check (GET /system, median of 15): kept-alive {kept_alive_direct_ms} ms direct, "
            "{kept_alive_relayed_ms} ms through the relay; new connection {new_connection_direct_ms} ms direct, "
            "{new_connection_relayed_ms} ms through the relay".format(**check)
        )
        return check

    # -- scaling -------------------------------------------------------------------------------------------------------

    def namespace_scaling(self) -> list[dict[str, Any]]:
        """WADO-RS through the relay (10 ms) with workers on 1 and 2 namespace hosts, 2 worker processes each."""
        rows: list[dict[str, Any]] = []
        try:
            nshosts.check_possible()
        except nshosts.HostsUnavailable as exc:
            say(f"  namespace hosts skipped: {exc}")
            return [{"skipped": str(exc)}]
        network = nshosts.BENCH
        with ExitStack() as stack:
            made = stack.enter_context(nshosts.namespace_hosts(network, 2))
            relay = Relay(("127.0.0.1", self.pacs.http_port), listen_host=network.server).start()
            stack.callback(relay.stop)
            self.relays["ns-http"] = relay
            stack.callback(self.relays.pop, "ns-http")
            url, redis_process = stack.enter_context(redis_server(self.root / "redis-ns", bind=network.server))
            source = {"downloader": "wado-rs", "url": f"http://{network.server}:{relay.port}/dicom-web"}
            config = engine_runs.write_config(
                self.root / "ns.toml",
                self.root / "state" / "ns",
                {"wadors_ns": {**source, "max_concurrency": 8}},
                broker=url,
            )
            for count in (1, 2):
                prefixes = [host.prefix for host in made[:count]]
                out = self.root / "out" / f"ns-{count}"
                with engine_runs.started_workers(config, prefixes, self.root / f"ns-logs-{count}", concurrency=2) as w:
                    label = f"trolley-tasks wado-rs 10 ms, {count} host(s) x 2 processes"
                    with self.measured(label) as record:
                        run = engine_runs.run_on_broker(
                            config,
                            self.cohort_csv,
                            "wadors_ns",
                            out,
                            w,
                            redis_process,
                            self.root / f"ns-{count}.log",
                            self.pacs_pid,
                            mode=f"{count} namespace host(s)",
                        )
                        self.engine_record(record, run, "wado-rs", True)
                        record["hosts"] = count
                        record["workers"] = 2 * count
                    rows.append(self.finish(record, out, self.catalogue, run.job_seconds))
        return rows

    # -- memory ----------------------------------------------------------------------------------------------------

    def memory_probe(self) -> dict[str, Any]:
        studies, series, instances = self.size.probe
        with redis_server(self.root / "redis-probe") as (url, _):
            figures = run_probe(url, url, str(self.root / "probe-out"), studies, series, instances)
        say(
            f"producer and Redis for {figures['expected']:,} queued instances: producer peak RSS "
            f"{figures['rss_mb']:.0f} MB, Redis {figures['redis_bytes_per_instance']:.0f} bytes/instance"
        )
        return figures

    def large_study(self) -> dict[str, Any]:
        series, instances, rows = self.size.large
        cohort = generate_cohort(1, series, instances, seed=99, rows=rows, columns=rows)
        self.large = self.load(cohort)
        csv = self.write_csv(self.root / "large.csv", cohort)
        size_mb = self.large.total_bytes / MB
        label = f"trolley-tasks wado-rs, one {size_mb:.0f} MB study ({series}x{instances} of {rows}x{rows})"
        record = self.embedded_run("wado-rs", cohort_csv=csv, label=label)
        record["study_mb"] = round(size_mb)
        return record

    # -- profiles ----------------------------------------------------------------------------------------------------

    def profiles(self, protocols: tuple[str, ...]) -> dict[str, Any]:
        """py-spy on the 2 workers of a broker run per protocol (fresh workers each time; the timed runs are not
        profiled): on-CPU samples on loopback, and for WADO-RS 10 ms away the task's wall time, waits included."""
        found: dict[str, Any] = {}
        folder = self.results_dir / "profiles"
        folder.mkdir(parents=True, exist_ok=True)
        plans = [(protocol, False) for protocol in protocols] + [("wado-rs", True)]
        with redis_server(self.root / "redis-profile") as (url, redis_process):
            config = engine_runs.write_config(
                self.root / "profile.toml", self.root / "state" / "profile", self.sources(), broker=url
            )
            for protocol, far in plans:
                label = protocol + (" 10 ms (wall time of the tasks, waits included)" if far else "")
                out = self.root / "out" / f"profile-{protocol}-{far}"
                logs = self.root / f"profile-logs-{protocol}-{far}"
                tag = f"{self.stamp}-{protocol}{'-10ms' if far else ''}"
                with (
                    engine_runs.started_workers(config, [[], []], logs) as workers,
                    Profiler([w.pid for w in workers], folder, tag, idle=far) as profiler,
                ):
                    engine_runs.run_on_broker(
                        config,
                        self.cohort_csv,
                        self.source_name(protocol, far),
                        out,
                        workers,
                        redis_process,
                        self.root / f"profile-{protocol}-{far}.log",
                        self.pacs_pid,
                    )
                verdict = verify(out, self.catalogue)
                shutil.rmtree(out, ignore_errors=True)
                found[label] = summarise(profiler, len(self.catalogue.instances), tasks_only=far)
                found[label]["protocol"] = protocol
                found[label]["verified"] = verdict.as_dict()
                found[label]["files"] = [str(path) for path in profiler.files]
                top = found[label].get("self", [])[:3]
                say(f"  profile {label}: " + "; ".join(f"{row['frame']} {row['share']:.0%}" for row in top))
        return found

    # -- the whole bench -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.stamp = datetime.now().strftime("%Y-%m-%d")
        started = time.perf_counter()
        load_start = os.getloadavg()
        busy_start = machine_busy()
        self.start()
        size = self.size
        self.figures["relay_check"] = self.relay_check()

        say("warming up (one reference WADO-RS pass, not counted)")
        warm = self.root / "out" / "warm"
        reference.wado_rs(self.pacs.dicomweb_url, self.cohort_csv, warm)
        shutil.rmtree(warm, ignore_errors=True)

        say(
            "loopback: per protocol the reference, trolley-tasks embedded (export --workers 2), and dicomtrolley 4.1.0 "
            "(its own venv, .bench/venv-dicomtrolley) where it has the protocol:"
        )
        for protocol in size.protocols:
            self.reference_run(protocol)
            self.embedded_run(protocol)
            if protocol == "wado-rs":  # issue 14: de-identifying on the way to disk, against the run just before
                self.embedded_run(protocol, deid=True)
            if size.dicomtrolley and protocol in ("wado-rs", "wado-uri"):
                self.dicomtrolley_run(protocol)
        if size.broker_protocols:
            self.broker_runs(size.broker_protocols)
        say("the PACS 10 ms away (the delaying relay, 5 ms each way):")
        for protocol in size.far_protocols:
            self.reference_run(protocol, far=True)
            self.embedded_run(protocol, far=True)
            if protocol == "wado-rs" and size.dicomtrolley:
                self.dicomtrolley_run("wado-rs", far=True)
        scaling: list[dict[str, Any]] = []
        if size.scaling or size.hosts:
            say("scaling, WADO-RS with the PACS 10 ms away:")
            for workers in size.scaling:
                scaling.append(
                    self.embedded_run(
                        "wado-rs", far=True, workers=workers, label=f"trolley-tasks wado-rs 10 ms, {workers} processes"
                    )
                )
            if size.hosts:
                scaling.extend(self.namespace_scaling())
        self.figures["scaling"] = [row.get("name") or row for row in scaling]
        say("memory:")
        self.figures["probe"] = self.memory_probe()
        self.figures["large_study"] = self.large_study()["name"]
        if size.profile:
            say("profiles (py-spy on the workers of separate broker runs, not the timed ones):")
            self.figures["profiles"] = self.profiles(size.protocols)
        busy = machine_busy() - busy_start
        elapsed = time.perf_counter() - started
        return {
            "date": datetime.now().isoformat(timespec="seconds"),
            "size": size.name,
            "cohort": {
                "studies": size.cohort[0],
                "series_per_study": size.cohort[1],
                "instances_per_series": size.cohort[2],
                "instances": len(self.catalogue.instances),
                "bytes": self.catalogue.total_bytes,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_at_start": [round(x, 2) for x in load_start],
                "load_at_end": [round(x, 2) for x in os.getloadavg()],
                "busy_cpu_fraction": round(busy / elapsed / (os.cpu_count() or 1), 3),
                "note": "shared machine: absolute figures move with other work; only ratios within one run count",
            },
            "elapsed_seconds": round(elapsed, 1),
            "runs": self.runs,
            **self.figures,
        }


def ensure_dicomtrolley() -> Path:
    """``.bench/venv-dicomtrolley/bin/python`` with dicomtrolley 4.1.0 from PyPI (never a dependency of ours)."""
    python = DICOMTROLLEY_VENV / "bin" / "python"
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('dicomtrolley'))"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == DICOMTROLLEY.split("==")[1]:
            return python
    say(f"installing {DICOMTROLLEY} from PyPI into {DICOMTROLLEY_VENV}")
    subprocess.run([sys.executable, "-m", "venv", str(DICOMTROLLEY_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", DICOMTROLLEY], check=True)
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("BENCH_SIZE") or "full")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Where the JSON (and profiles) go.")
    parser.add_argument(
        "--docs", action=argparse.BooleanOptionalAction, default=None, help="Rewrite docs/performance.md's tables."
    )
    options = parser.parse_args(argv)
    from bench.tables import markdown, update_doc

    size = SIZES[options.size]
    root = Path(tempfile.mkdtemp(prefix="trolley-bench-"))
    options.results.mkdir(parents=True, exist_ok=True)
    bench = Bench(size, root, options.results)
    say(f"make bench, size {size.name}, in {root}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    try:
        results = bench.run()
    finally:
        bench.stack.close()
        shutil.rmtree(root, ignore_errors=True)
    suffix = "" if size.name == "full" else f"-{size.name}"
    path = options.results / f"{bench.stamp}{suffix}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    say("\n" + table)
    say(f"results: {path}")
    if options.docs or (options.docs is None and size.name == "full"):
        update_doc(PERFORMANCE_DOC, table, results, BEGIN, END)
        say(f"updated {PERFORMANCE_DOC}")
    failed = [run["name"] for run in results["runs"] if run.get("kind") != "dicomtrolley" and not run["verified"]["ok"]]
    if failed:
        say(f"VERIFICATION FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
