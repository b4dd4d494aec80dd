"""trolley-tasks as a user runs it: the real ``trolley-tasks export`` command, in embedded mode or on a broker with
workers started beforehand, with every process of the run accounted for.

- **Embedded** (``export --workers N``, no broker): the command starts its private Redis and N workers, submits,
  waits and stops them. The job time is read from the report the engine writes (``started_at`` to ``finished_at``:
  the clock starts at the first fetch claim, after the first study's expansion); the wall time is the command's,
  start-up and shut-down included. CPU is the command's whole process tree (``RUSAGE_CHILDREN`` once it is reaped:
  the command, its Redis, its workers and their pool processes), start-up included.
- **Broker** (a plain ``redis-server`` and N ``trolley-tasks worker --concurrency 1`` started and ready before the
  clock starts): the command submits and waits. CPU of the workers (with their pool processes) and of Redis is read
  with psutil just before the command starts and just after it ends: the engine's CPU for the job alone, which is what
  P5 compares with the reference client. The command's own CPU (a Python start-up, the producer, the progress
  display) is reported beside it.

Peak RSS is each process's ``VmHWM`` (the kernel's high-water mark), sampled every quarter second.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from testbed.processes import stop, stop_all

TROLLEY = [sys.executable, "-m", "trolley_tasks.cli"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pids: list[int]) -> float:
    """User + system seconds of these processes now (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        with suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def tree(pid: int) -> list[int]:
    """The process and every descendant (psutil)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def vm_hwm(pid: int) -> int:
    """Peak resident set of a process in bytes (``VmHWM``), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def role_of(pid: int) -> str:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "gone"
    if "redis-server" in cmdline:
        return "redis"
    if " worker" in cmdline:
        return "worker"
    return "command"


class ProcessWatch:
    """Samples the process trees under ``roots`` every ``interval`` seconds: peak RSS per process, by role."""

    def __init__(self, roots: list[int], interval: float = 0.25) -> None:
        self.roots = roots
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        for root in self.roots:
            for pid in tree(root):
                peak = vm_hwm(pid)
                role, before = self.peaks.get(pid, ("", 0))
                self.peaks[pid] = (role or role_of(pid), max(before, peak))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def peak(self, role: str) -> int:
        return max((peak for r, peak in self.peaks.values() if r == role), default=0)

    def pids(self, role: str) -> list[int]:
        return [pid for pid, (r, _) in self.peaks.items() if r == role]


def write_config(path: Path, state_dir: Path, sources: Mapping[str, Mapping[str, Any]], broker: str = "") -> Path:
    """A trolley-tasks configuration with these ``[sources.NAME]`` tables (and a broker, or none: embedded)."""
    lines = [f'state_dir = "{state_dir}"']
    if broker:
        lines += ["[broker]", f'url = "{broker}"']
    for name, table in sources.items():
        lines.append(f"[sources.{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def report_seconds(out: Path) -> tuple[float, dict[str, Any]]:
    """(finished_at - started_at, the report's job summary) from ``<out>/trolley-report.json``."""
    report = json.loads((out / "trolley-report.json").read_text())
    job = report.get("job", report)
    started = datetime.fromisoformat(job["started_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    return (finished - started).total_seconds(), job


def submit_to_done(config: Path, job_id: str) -> float | None:
    """The ledger's ``created_at`` to ``finished_at`` of a job, read on the configured broker."""
    from trolley_tasks.engine.api import EngineClient
    from trolley_tasks.engine.settings import load_settings

    client = EngineClient(load_settings(config))
    try:
        status = client.status(job_id)
    finally:
        client.close()
    if status.created_at is None or status.finished_at is None:
        return None
    return (status.finished_at - status.created_at).total_seconds()


@dataclass
class EngineRun:
    """What one ``trolley-tasks export`` did."""

    mode: str
    source: str
    workers: int
    wall_seconds: float
    job_seconds: float
    counts: dict[str, Any]
    cpu_seconds: float
    """Every process of the engine for the job (see the module docstring for what each mode includes)."""
    command_cpu_seconds: float
    peak_rss: dict[str, int]
    pacs_cpu_seconds: float = 0.0
    submit_to_done_seconds: float | None = None
    """On a broker: the ledger's ``created_at`` (the submit) to ``finished_at``, expansion included."""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _export_command(
    config: Path, cohort_csv: Path, source: str, out: Path, workers: int | None, extra: Sequence[str] = ()
) -> list[str]:
    command = [*TROLLEY, "export", str(cohort_csv), "--config", str(config), "--source", source, "--out", str(out)]
    command += extra
    if workers is not None:
        command += ["--workers", str(workers)]
    else:
        command += ["--wait"]
    return command + ["--log-level", "warning"]


def _environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TROLLEY_")}
    env.update({"COLUMNS": "100", "PYTHONPATH": os.getcwd()})
    env.update(extra or {})
    return env


def run_embedded(
    config: Path,
    cohort_csv: Path,
    source: str,
    out: Path,
    workers: int,
    log: Path,
    pacs_pid: int,
    deid_key: str = "",
) -> EngineRun:
    """``trolley-tasks export --workers N`` in embedded mode (see the module docstring); with ``deid_key``, a
    de-identified export (``--deid basic``, the key in ``TROLLEY_DEID_KEY``)."""
    extra, env = (["--deid", "basic"], {"TROLLEY_DEID_KEY": deid_key}) if deid_key else ([], {})
    command = _export_command(config, cohort_csv, source, out, workers, extra)
    cpu_before, pacs_before = children_cpu(), cpu_of([pacs_pid])
    started = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=_environment(env))
    try:
        with ProcessWatch([process.pid]) as watch:
            code = process.wait()
            watch.sample()
    except BaseException:  # interrupted: the command pauses its job and stops its workers and Redis on SIGINT
        stop(process, signal.SIGINT, timeout=90)
        raise
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited {code}: {log.read_text()[-2000:]}")
    seconds, job = report_seconds(out)
    return EngineRun(
        mode="embedded",
        source=source,
        workers=workers,
        wall_seconds=wall,
        job_seconds=seconds,
        counts=job["counts"],
        cpu_seconds=children_cpu() - cpu_before,
        command_cpu_seconds=0.0,
        peak_rss={"worker": watch.peak("worker"), "command": watch.peak("command"), "redis": watch.peak("redis")},
        pacs_cpu_seconds=cpu_of([pacs_pid]) - pacs_before,
        notes=["CPU: the whole command tree, start-up of the command, its Redis and its workers included"],
    )


def wait_for_workers(config: Path, count: int, timeout: float = 90) -> None:
    """Until ``count`` workers answer Celery's control ping (``trolley-tasks workers``' view)."""
    from trolley_tasks.engine.api import EngineClient
    from trolley_tasks.engine.settings import load_settings

    client = EngineClient(load_settings(config))
    try:
        deadline = time.monotonic() + timeout
        while len(client.workers(timeout=1.0)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} workers did not answer within {timeout:g} s")
    finally:
        client.close()


@contextmanager
def started_workers(
    config: Path,
    prefixes: list[list[str]],
    logs: Path,
    concurrency: int = 1,
    env: Mapping[str, str] | None = None,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One ``trolley-tasks worker --concurrency N`` per entry of ``prefixes`` (``[]`` here, or ``ip netns exec HOST``
    on a namespace host), ready when this yields; warm-stopped by PID (SIGTERM), killed after 60 s."""
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
    try:
        for index, prefix in enumerate(prefixes):
            command = [
                *prefix, *TROLLEY, "worker", "--config", str(config), "--concurrency", str(concurrency),
                "--hostname", f"bench{index + 1}-{tag}@%h", "--loglevel", "warning",
            ]  # fmt: skip
            with open(logs / f"worker-{index + 1}.log", "wb") as output:
                processes.append(
                    subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=_environment(env))
                )
        wait_for_workers(config, len(prefixes))
        yield processes
    finally:
        stop_all(processes, timeout=60)


def run_on_broker(
    config: Path,
    cohort_csv: Path,
    source: str,
    out: Path,
    workers: list[subprocess.Popen[bytes]],
    redis_process: subprocess.Popen[bytes],
    log: Path,
    pacs_pid: int,
    mode: str = "broker",
) -> EngineRun:
    """``trolley-tasks export --wait`` on a broker whose workers already run (see the module docstring)."""
    command = _export_command(config, cohort_csv, source, out, None)
    engine_pids = [pid for worker in workers for pid in tree(worker.pid)] + [redis_process.pid]
    cpu_before, command_before, pacs_before = cpu_of(engine_pids), children_cpu(), cpu_of([pacs_pid])
    started = time.perf_counter()
    with ProcessWatch([worker.pid for worker in workers]) as watch, open(log, "wb") as output:
        code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=_environment()).returncode
        watch.sample()
    wall = time.perf_counter() - started
    engine_cpu = cpu_of(engine_pids) - cpu_before
    if code != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited {code}: {log.read_text()[-2000:]}")
    seconds, job = report_seconds(out)
    return EngineRun(
        submit_to_done_seconds=submit_to_done(config, job["job_id"]),
        mode=mode,
        source=source,
        workers=len(workers),
        wall_seconds=wall,
        job_seconds=seconds,
        counts=job["counts"],
        cpu_seconds=engine_cpu,
        command_cpu_seconds=children_cpu() - command_before,
        peak_rss={"worker": watch.peak("worker")},
        pacs_cpu_seconds=cpu_of([pacs_pid]) - pacs_before,
        notes=["CPU: the workers (main and pool processes) and Redis from submit to done; the command apart"],
    )
