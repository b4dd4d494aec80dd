"""Container health check: this host's worker answers a Celery ping within a few seconds."""

from __future__ import annotations

import socket
import sys

from trolley_tasks.engine.celery_app.app import make_app
from trolley_tasks.engine.settings import load_settings


def main() -> int:
    replies = make_app(load_settings()).control.ping(destination=[f"celery@{socket.gethostname()}"], timeout=5.0)
    return 0 if replies else 1


if __name__ == "__main__":
    sys.exit(main())
