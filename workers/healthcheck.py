"""Container health check: a worker of THIS host answers Celery's control ping within a few seconds.

Why a ping and not "the process exists": a worker whose main process is stuck (a broker connection that hangs, a
deadlock) still exists, but answers no control message, takes no task and runs no watchdog tick. The ping goes through
the broker, so it also fails when this host has lost the broker, which is what an orchestrator should restart on.

"This host" is every node whose name ends in ``@<hostname>`` (``celery@…`` by default, or ``--hostname NAME@%h``),
so the check holds however the node is named. Exit 0: at least one answered; 1: none did.
"""

from __future__ import annotations

import socket
import sys

from trolley_tasks.engine.celery_app.app import make_app
from trolley_tasks.engine.settings import load_settings

TIMEOUT = 5.0


def main() -> int:
    app = make_app(load_settings())
    host = socket.gethostname()
    try:
        replies = app.control.ping(timeout=TIMEOUT) or []
    finally:
        app.close()
    ours = [name for reply in replies for name in reply if name.partition("@")[2] == host]
    print(f"{host}: {', '.join(ours) or 'no worker answered'}")
    return 0 if ours else 1


if __name__ == "__main__":
    sys.exit(main())
