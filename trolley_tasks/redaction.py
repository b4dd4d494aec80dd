"""What may leave the process in a log line or an error message: no secrets, no patient data, no whole datasets.

Two lines of defence behind the first one (the configuration holds only the *names* of secrets; messages, errors and
row descriptions are written without patient values):

- secrets: ``user:password@`` in URLs, ``Authorization`` header values and ``password=``/``token=`` pairs become
  ``***``;
- patient data in URLs: a query string after a path (``/studies?PatientID=...``, as urllib3 logs its requests at
  DEBUG) becomes ``?***``;
- size: a message longer than :data:`MAX_MESSAGE` characters (a dumped pydicom Dataset, a JSON metadata answer) is
  cut, with the number of characters dropped.
"""

from __future__ import annotations

import logging
import re

MAX_MESSAGE = 2000

_PATTERNS = (
    (re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@", re.I), r"\g<scheme>***@"),
    (re.compile(r"(?P<key>authorization['\"]?\s*[:=]\s*['\"]?)(basic|bearer)?\s*[^\s'\",}]+", re.I), r"\g<key>***"),
    (re.compile(r"(?P<key>(password|passwd|token|secret)['\"]?\s*[:=]\s*['\"]?)[^\s'\",&}]+", re.I), r"\g<key>***"),
    (re.compile(r"(?P<path>/[^\s?\"'<>]*)\?[^\s\"'<>]+"), r"\g<path>?***"),
)


def scrub(text: str) -> str:
    """``text`` with credentials and URL query strings masked, cut to :data:`MAX_MESSAGE` characters."""
    for pattern, replacement in _PATTERNS:
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
