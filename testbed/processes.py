"""Stopping the processes the tests and the bench start: ask with a signal, wait, then kill.

One helper for every Orthanc, relay, worker, export command and profiler the tests and the bench run, so that none
is left behind when a run ends or is interrupted. (The engine's embedded mode stops its own workers and logs a kill;
it lives in the package and does not import from here.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable
from typing import Any


def stop_all(
    processes: Iterable[subprocess.Popen[Any]], sig: int = signal.SIGTERM, timeout: float = 30, group: bool = False
) -> None:
    """Send ``sig`` to every running process of ``processes`` first (they stop side by side), then wait up to
    ``timeout`` seconds for each and kill what is left: the process, or with ``group`` its whole process group (a
    Celery worker's pool children)."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30, group: bool = False) -> None:
    """:func:`stop_all` for one process."""
    stop_all([process], sig, timeout, group)
