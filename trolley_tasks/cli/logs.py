"""Logging for the command line: everything under the ``trolley`` logger, as text or JSON lines, on stderr.

Every record that leaves through these handlers is scrubbed (:mod:`trolley_tasks.redaction`): no secrets, no query
strings (patient data), no full datasets. Workers put the same filter on Celery's handlers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from trolley_tasks.redaction import ScrubbingFilter, keep_values_out_of_library_logs, scrub

__all__ = ["LEVELS", "LOGGER_NAME", "JsonFormatter", "ScrubbingFilter", "scrub", "setup_logging"]

LOGGER_NAME = "trolley"
LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "source"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_text:
            entry["error"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "warning", as_json: bool = False, stream: TextIO | None = None) -> logging.Logger:
    """Configure the ``trolley`` logger (idempotent: a second call replaces the first's handler), and keep DICOM
    values out of what pydicom and pynetdicom log in this process."""
    keep_values_out_of_library_logs()
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_trolley_cli", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._trolley_cli = True  # type: ignore[attr-defined]
    handler.addFilter(ScrubbingFilter())
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger
