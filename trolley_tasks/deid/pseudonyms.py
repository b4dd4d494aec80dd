"""Keyed pseudonyms: the same original and key give the same pseudonym, on any host, in any job, in any year.

Every pseudonym is an HMAC-SHA256 (RFC 2104) of the original value under the export's key, with a label per kind
of value so that a PatientID and an AccessionNumber that happen to be equal get unrelated pseudonyms. Without the key
a pseudonym says nothing about its original (the HMAC is a PRF); with it, a linking table can be rebuilt from the
originals, which is why the key is a secret kept like a password and never written anywhere by trolley-tasks.

- UIDs become ``2.25.<decimal of the first 128 bits>`` (PS3.5 B.2: a UUID-derived UID; at most 44 characters, the
  limit is 64). The mapping is a function of the original, so study/series/instance relationships and references
  (ReferencedSOPInstanceUID, FrameOfReferenceUID) hold across files without any shared state.
- Identifiers (PatientID, AccessionNumber) become 16 characters of base32 (fits SH, 16 characters, PS3.5 6.2).
- The date shift of a patient is 1 to 3650 days back, from the HMAC of the patient's original PatientID: every
  date of a patient moves by the same amount, so intervals between studies survive (PS3.15 E.3.6).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

UID_PREFIX = "2.25."
MAX_SHIFT_DAYS = 3650


class Pseudonyms:
    """The pseudonyms of one key. Cheap; holds no table."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a pseudonym key must not be empty")
        self._key = key

    def __repr__(self) -> str:  # never the key, even in a traceback's locals
        return "Pseudonyms(key=***)"

    def _mac(self, label: str, value: str) -> bytes:
        return hmac.new(self._key, f"{label}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A new valid UID for ``original``: ``2.25.`` and a 128-bit integer."""
        return UID_PREFIX + str(int.from_bytes(self._mac("uid", original.strip())[:16], "big"))

    def identifier(self, kind: str, original: str) -> str:
        """A 16-character pseudonym of an identifier of kind ``kind`` (``PatientID``, ``AccessionNumber``)."""
        return base64.b32encode(self._mac(kind, original.strip())).decode()[:16]

    def date_shift_days(self, patient_id: str) -> int:
        """How many days every date of this patient moves back (1 to :data:`MAX_SHIFT_DAYS`)."""
        return 1 + int.from_bytes(self._mac("date-shift", patient_id.strip())[:4], "big") % MAX_SHIFT_DAYS

    def fingerprint(self) -> str:
        """16 hex digits that tell two keys apart without telling anything about either (an HMAC of a constant):
        the job record keeps it, so that a worker holding another key pauses the job instead of writing files
        under pseudonyms that do not match the rest of the export."""
        return self._mac("fingerprint", "trolley-tasks").hex()[:16]
