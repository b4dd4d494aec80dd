"""Micro-benchmark: the CPU that open, idle DICOM associations cost (pynetdicom polls every millisecond).

    .venv/bin/python -m bench.idle_associations [--seconds S]

It starts a pynetdicom Verification SCP in a child process on a free loopback port, opens 0, 1, 2 and 4
associations to it from this process, leaves them idle for ``S`` seconds each time, and prints the CPU share of a
core that each side used meanwhile (psutil). The requestor side is what an engine worker pays for each association
it keeps open between requests; the acceptor side is what a C-MOVE receiver pays for each incoming association.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.engine_runs import cpu_of
from testbed.orthanc import free_port
from testbed.processes import stop

_SCP = """
import sys
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE()
ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True)
"""


def wait_until_ready(ae: AE, port: int, timeout: float = 30.0) -> None:
    """Until the SCP accepts an association (released at once)."""
    deadline = time.monotonic() + timeout
    while True:
        assoc = ae.associate("127.0.0.1", port)
        if assoc.is_established:
            assoc.release()
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the Verification SCP did not accept an association within {timeout:g} s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Idle time measured per count.")
    args = parser.parse_args(argv)
    port = free_port()
    scp = subprocess.Popen([sys.executable, "-c", _SCP, str(port)])
    try:
        me, server = os.getpid(), scp.pid
        ae = AE()
        ae.add_requested_context(Verification)
        wait_until_ready(ae, port)
        print("idle associations | requestor side (% of a core) | acceptor side (% of a core)")
        for count in (0, 1, 2, 4):
            associations = [ae.associate("127.0.0.1", port) for _ in range(count)]
            if not all(assoc.is_established for assoc in associations):
                raise SystemExit("the Verification SCP refused an association")
            time.sleep(0.5)  # past the association's set-up
            ours, theirs, started = cpu_of([me]), cpu_of([server]), time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - started
            requestor, acceptor = (
                100 * (cpu_of([pid]) - before) / elapsed for pid, before in ((me, ours), (server, theirs))
            )
            print(f"{count} | {requestor:.1f} | {acceptor:.1f}", flush=True)
            for assoc in associations:
                assoc.release()
    finally:
        stop(scp, timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
