"""What may leave the process in a log line or an error message: no secrets, no patient data, no whole datasets.

Two lines of defence behind the first one (the configuration holds only the *names* of secrets; messages, errors and
row descriptions are written without patient values):

- secrets: ``user:password@`` in URLs, ``Authorization`` header values and ``password=``/``token=`` pairs become
  ``***``;
- patient data in URLs: a query string after a path (``/studies?PatientID=...``, as urllib3 logs its requests at
  DEBUG) becomes ``?***``;
- size: a message longer than :data:`MAX_MESSAGE` characters (a dumped pydicom Dataset, a JSON metadata answer) is
  cut, with the number of characters dropped;
- values in pydicom's validation messages (``Invalid value for VR DA: '1961-07-14'.``) become ``***``.

The DICOM libraries log values of their own, and :func:`keep_values_out_of_library_logs` turns that off in the
processes that log (the CLI and the workers): pynetdicom writes every C-FIND request and response identifier line by
line at INFO (PatientID, PatientName, ...), and pydicom names a value that fails its validation (a birth date written
``1961-07-14``, as some PACS keep it) in a warning. The scrubbing above stays as the last line.
"""

from __future__ import annotations

import logging
import re

from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config

MAX_MESSAGE = 2000

_PATTERNS = (
    (re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@", re.I), r"\g<scheme>***@"),
    (re.compile(r"(?P<key>authorization['\"]?\s*[:=]\s*['\"]?)(basic|bearer)?\s*[^\s'\",}]+", re.I), r"\g<key>***"),
    (re.compile(r"(?P<key>(password|passwd|token|secret)['\"]?\s*[:=]\s*['\"]?)[^\s'\",&}]+", re.I), r"\g<key>***"),
    (re.compile(r"(?P<path>/[^\s?\"'<>]*)\?[^\s\"'<>]+"), r"\g<path>?***"),
    # pydicom's validation messages: "Invalid value for VR DA: '...'." and 'Value "..." is not valid for ...'
    (re.compile(r"(?P<key>Invalid value for VR \w\w: ).*?(?P<end>\.?(?: Please see|$))", re.M), r"\g<key>***\g<end>"),
    (re.compile(r'(?P<key>Value )".*?"(?P<end> is not valid for elements with a VR of)'), r"\g<key>***\g<end>"),
)


def scrub(text: str) -> str:
    """``text`` with credentials and URL query strings masked, cut to :data:`MAX_MESSAGE` characters."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... [{len(text) - MAX_MESSAGE} more characters cut]"
    return text


def keep_values_out_of_library_logs() -> None:
    """Stop pydicom and pynetdicom from logging DICOM values in this process (see the module docstring).

    Process-wide settings of both libraries, for the processes that log (the CLI and the workers), not for a
    program that imports the library: pynetdicom's ``LOG_REQUEST_IDENTIFIERS`` and ``LOG_RESPONSE_IDENTIFIERS`` off,
    and pydicom's ``reading_validation_mode`` to ``IGNORE``. A value that does not conform is kept as the server
    sent it either way; the engine checks the UIDs it relies on itself (``core.objects.is_valid_uid``).
    """
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


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
