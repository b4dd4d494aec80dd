"""py-spy on the engine's workers: ``py-spy record --format raw --subprocesses --nonblocking --pid <worker>`` attached
to each worker's main process (its pool processes included) from submit to done, then summarised: where the on-CPU
samples are (by leaf function, and by the functions of ``trolley_tasks`` they pass through).

py-spy comes from PyPI into ``.bench/venv-tools`` (not a dependency of the project). It needs ptrace: root, or
``CAP_SYS_PTRACE`` in a container; when it cannot attach, the bench says so and goes on.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from testbed.processes import stop_all

TOOLS = Path(".bench/venv-tools")
PY_SPY = TOOLS / "bin" / "py-spy"
RATE = 100
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def ensure_py_spy() -> Path:
    """``.bench/venv-tools/bin/py-spy``, installed from PyPI the first time."""
    if not PY_SPY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    return PY_SPY


class Profiler:
    """py-spy record on some processes for as long as the block runs."""

    def __init__(self, pids: list[int], folder: Path, label: str, idle: bool = False) -> None:
        self.pids = pids
        self.idle = idle
        self.files = [folder / f"{label}-{pid}.txt" for pid in pids]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.errors: list[str] = []
        self.seconds = 0.0

    def __enter__(self) -> Profiler:
        binary = ensure_py_spy()
        for pid, path in zip(self.pids, self.files, strict=True):
            command = [
                str(binary), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--format", "raw",
                "--rate", str(RATE), "--output", str(path), *(["--idle"] if self.idle else []),
            ]  # fmt: skip
            self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)  # py-spy attaches
        for process in self.processes:
            if process.poll() is not None:
                assert process.stderr is not None
                self.errors.append(process.stderr.read().decode(errors="replace").strip()[-300:])
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        stop_all(self.processes, signal.SIGINT, timeout=60)  # on SIGINT, py-spy writes its output and exits

    def stacks(self) -> Counter[tuple[str, ...]]:
        counts: Counter[tuple[str, ...]] = Counter()
        for path in self.files:
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    counts[tuple(stack.split(";"))] += int(count)
        return counts


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    where = match.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    where = where.split("/wt-bench/", 1)[-1]
    return f"{match.group('func')} ({where}{':' + match.group('line') if match.group('line') else ''})"


def _function(frame: str) -> str:
    """A frame without its line number: samples of one function add up."""
    return re.sub(r":\d+\)$", ")", _name(frame))


TASK_FRAMES = ("fetch_batch (", "expand_row (", "finalize_job (")


def summarise(profiler: Profiler, instances: int, top: int = 12, tasks_only: bool = False) -> dict[str, Any]:
    """Samples by leaf function (self) and by ``trolley_tasks`` function on the stack (inclusive), as shares of all
    samples, plus samples / rate / instances in milliseconds. Without ``--idle`` the samples are of threads py-spy
    sees running (its idle detection is a heuristic: a thread blocked in a socket read may count). With ``--idle``
    and ``tasks_only``, only the stacks of the task being run (fetch, expansion, finalize): where a task's wall time
    goes, waiting included."""
    stacks = profiler.stacks()
    if tasks_only:
        stacks = type(stacks)(
            {stack: n for stack, n in stacks.items() if any(f.startswith(TASK_FRAMES) for f in stack)}
        )
    total = sum(stacks.values())
    if not total:
        return {"error": "; ".join(profiler.errors) or "py-spy recorded no samples", "samples": 0}
    leaf: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    where: Counter[str] = Counter()
    for stack, count in stacks.items():
        # with --subprocesses a stack starts with the process chain: the worker, then its pool process (the tasks)
        where["pool process (tasks)" if sum(f.startswith("process ") for f in stack) > 1 else "main process"] += count
        frames = [frame for frame in stack if "(" in frame and not frame.startswith("process ")]
        if frames:
            leaf[_function(frames[-1])] += count
        for name in {_function(frame) for frame in frames if "trolley_tasks/" in frame and "/cli/" not in frame}:
            ours[name] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {
                "frame": name,
                "share": count / total,
                "ms_per_instance": 1000 * count / RATE / max(1, instances),
            }
            for name, count in counter.most_common(top)
        ]

    return {
        "samples": total,
        "idle_included": profiler.idle,
        "tasks_only": tasks_only,
        "seconds": profiler.seconds,
        "rate": RATE,
        "cpu_seconds_sampled": total / RATE,
        "ms_per_instance_sampled": 1000 * total / RATE / max(1, instances),
        "by_process": {name: count / total for name, count in where.items()},
        "self": rows(leaf),
        "inclusive_trolley_tasks": rows(ours),
        "errors": profiler.errors,
    }
