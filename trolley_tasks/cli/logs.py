"""Logging for the command line: everything under the ``trolley`` logger, as text or JSON lines, on stderr.

Two guarantees hold for every record that leaves through these handlers, whoever logged it:

- no secrets: ``user:password@`` in URLs, ``Authorization`` header values and ``password=``/``token=`` pairs are
  replaced by ``***`` (a second line of defence: the configuration only ever holds the *names* of secrets);
- no full datasets: a message longer than :data:`MAX_MESSAGE` characters (a dumped pydicom Dataset, a JSON
  metadata answer) is cut, with the number of characters dropped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

LOGGER_NAME = "trolley"
MAX_MESSAGE = 2000
LEVELS = ("debug", "info", "warning", "error")

_SECRET_PATTERNS = (
    (re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@", re.I), r"\g<scheme>***@"),
    (re.compile(r"(?P<key>authorization['\"]?\s*[:=]\s*['\"]?)(basic|bearer)?\s*[^\s'\",}]+", re.I), r"\g<key>***"),
    (re.compile(r"(?P<key>(password|passwd|token|secret)['\"]?\s*[:=]\s*['\"]?)[^\s'\",&}]+", re.I), r"\g<key>***"),
)


def scrub(text: str) -> str:
    """``text`` with credentials masked and cut to :data:`MAX_MESSAGE` characters."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... [{len(text) - MAX_MESSAGE} more characters cut]"
    return text


class ScrubbingFilter(logging.Filter):
    """Renders each record's message once, scrubbed, so no handler can print the raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # keep the exception's type and scrubbed message, drop the traceback's locals and frames
            record.exc_text = scrub(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
            record.exc_info = None
        return True


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
    """Configure the ``trolley`` logger (idempotent: a second call replaces the first's handler)."""
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
