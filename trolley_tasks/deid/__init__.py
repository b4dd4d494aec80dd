"""De-identification on the fly: PS3.15 Annex E profiles, keyed pseudonyms, and the header rewrite of a stream.

>>> deid = Deidentifier(BUILT_IN["basic"], BUILT_IN["basic"].read_key())
>>> for chunk in deid.stream(chunks): ...        # a Part 10 file, header rewritten, pixel data bytes unchanged

See docs/deid.md for the profile table and the handling of keys and linking tables.
"""

from trolley_tasks.deid.profile import BUILT_IN, DEFAULT_KEY_ENV, PHI_IN_CONTENT_SOP_CLASSES, DeidProfile
from trolley_tasks.deid.pseudonyms import Pseudonyms
from trolley_tasks.deid.rewrite import DeidentificationError, Deidentifier, ExcludedByProfile

__all__ = [
    "BUILT_IN",
    "DEFAULT_KEY_ENV",
    "PHI_IN_CONTENT_SOP_CLASSES",
    "DeidProfile",
    "DeidentificationError",
    "Deidentifier",
    "ExcludedByProfile",
    "Pseudonyms",
]
