"""Path layouts: how a DICOM instance's attributes become a path under the output directory, safely.

A layout is a template over DICOM keywords, for example
``{PatientID}/{StudyDate}_{AccessionNumber}/{Modality}_{SeriesInstanceUID}/{SOPInstanceUID}.dcm``. Values come from
the PACS, so every one is treated as hostile:

- a UID keyword (VR UI) must follow the UID grammar (PS3.5 section 9.1), or the path is refused;
- any value holding a path separator (``/`` or ``\\``) or NUL, or being ``.`` or ``..``, is refused
  (:class:`UnsafePathError`): it would climb out of, or reshape, the output directory;
- other values are sanitized: characters outside ``[A-Za-z0-9._-^ ]`` become ``_``, a leading ``.`` becomes ``_``
  (no hidden files), values are cut to 64 characters, and an empty or absent value becomes ``UNKNOWN``.

With ``uid_dot="_"`` the dots of UID values become underscores: dicomtrolley's file names (``1_2_3/1_2_3_4/1_2_3_4_5``),
still one name per UID, since a UID holds only digits and dots. :data:`STUDY_SERIES` and :data:`FLAT` are our named
layouts (dotted, ``.dcm``); :data:`DICOMTROLLEY_STUDY_SERIES` and :data:`DICOMTROLLEY_FLAT` are dicomtrolley's.

A template is checked when it is built (:class:`ConfigurationError` otherwise): only known DICOM keywords with a
printable VR, no format specs, a relative path, and a file name that is unique per SOPInstanceUID, because two
instances must never be written to one file.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

from trolley_tasks.core import is_valid_uid
from trolley_tasks.errors import ConfigurationError, UnsafePathError

SAFE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "._-^ ")
MAX_VALUE_LENGTH = 64
UNKNOWN = "UNKNOWN"
REFERENCE_KEYWORDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})
"""The keywords an InstanceReference alone can fill."""
SERIES_KEYWORDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID"})

_UID_CHARACTERS = frozenset("0123456789.")
_NOT_PRINTABLE_VRS = {"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_FORBIDDEN = ("/", "\\", "\x00")


@dataclass(frozen=True)
class _Field:
    keyword: str
    is_uid: bool


Token = str | _Field
Lookup = Callable[[str], object]
"""Gives the value of a DICOM keyword (None when absent)."""


def path_component(value: object, keyword: str, *, is_uid: bool = False) -> str:
    """One value made safe to be (part of) a path component. See the module docstring for the rules.

    Raises
    ------
    UnsafePathError
        The value would escape or reshape the output directory, or a UID value is not a UID.
    """
    if value is None:
        text = ""
    elif isinstance(value, MultiValue | list | tuple):
        text = "-".join(str(item) for item in value)
    elif isinstance(value, bytes):
        raise UnsafePathError(f"{keyword} holds bytes, not text; it cannot name a path")
    else:
        text = str(value)
    text = text.strip()
    if any(bad in text for bad in _FORBIDDEN) or text in (".", ".."):
        raise UnsafePathError(f"{keyword} value {text[:80]!r} would escape or reshape the output directory")
    if not text:
        return UNKNOWN
    if is_uid:
        if not is_valid_uid(text):
            raise UnsafePathError(f"{keyword} value {text[:80]!r} is not a DICOM UID; refusing to use it in a path")
        return text
    safe = "".join(char if char in SAFE_CHARACTERS else "_" for char in text)[:MAX_VALUE_LENGTH]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe


class PathTemplate:
    """A checked template over DICOM keywords. See the module docstring.

    Parameters
    ----------
    template
        For example ``"{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"``.

    Raises
    ------
    ConfigurationError
        Unknown keyword, a sequence or binary keyword, a format spec, an absolute path, an empty or ``..``
        component, a character outside the safe set in the literal text, or a file name that does not identify the
        SOPInstanceUID unambiguously.
    """

    def __init__(self, template: str, *, uid_dot: str = ".") -> None:
        if uid_dot not in (".", "_"):
            raise ConfigurationError(f"uid_dot must be '.' or '_', not {uid_dot!r}")
        self.template = template
        self.uid_dot = uid_dot
        self.components = _parse(template, uid_dot)
        self.keywords = frozenset(
            token.keyword for component in self.components for token in component if isinstance(token, _Field)
        )

    def __repr__(self) -> str:
        dots = f", uid_dot={self.uid_dot!r}" if self.uid_dot != "." else ""
        return f"PathTemplate({self.template!r}{dots})"

    @property
    def needs_dataset(self) -> bool:
        """True when the path uses attributes other than the three UIDs of an InstanceReference."""
        return not self.keywords <= REFERENCE_KEYWORDS

    @functools.cached_property
    def folders_by_series(self) -> bool:
        """True when every folder of the path is named by literals, StudyInstanceUID and SeriesInstanceUID only: all
        instances of a series then lie in one folder."""
        return all(
            token.keyword in SERIES_KEYWORDS
            for component in self.components[:-1]
            for token in component
            if isinstance(token, _Field)
        )

    def render(self, lookup: Lookup) -> PurePosixPath:
        """The relative path for the values ``lookup`` gives. Raises UnsafePathError; never returns an escape."""
        parts = []
        for component in self.components:
            text = "".join(token if isinstance(token, str) else self._value(token, lookup) for token in component)
            if text in (".", ".."):  # e.g. "{A}{B}" with A = B = "."; each alone is refused, but be sure
                raise UnsafePathError(f"path component {text!r} built from {self.template!r} would escape")
            parts.append(text)
        return PurePosixPath(*parts)

    def _value(self, token: _Field, lookup: Lookup) -> str:
        text = path_component(lookup(token.keyword), token.keyword, is_uid=token.is_uid)
        return text.replace(".", self.uid_dot) if token.is_uid else text


def _parse(template: str, uid_dot: str = ".") -> list[list[Token]]:
    if not template or template.startswith("/") or "\\" in template or "\x00" in template:
        raise ConfigurationError(f"path template {template!r} must be a relative path with '/' separators")
    tokens: list[Token] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(f"path template {template!r} is malformed: {exc}") from exc
    for literal, name, spec, conversion in parsed:
        bad = sorted({char for char in literal if char not in SAFE_CHARACTERS and char != "/"})
        if bad:
            raise ConfigurationError(f"path template {template!r} holds characters {bad} outside [A-Za-z0-9._-^ /]")
        if literal:
            tokens.append(literal)
        if name is None:
            continue
        if spec or conversion:
            raise ConfigurationError(f"path template field {{{name}}}: format specs and conversions are not supported")
        tokens.append(_field(name, template))
    components = _split(tokens)
    for component in components:
        only_literal = all(isinstance(token, str) for token in component)
        literal = "".join(token for token in component if isinstance(token, str))
        if not component or (only_literal and literal in (".", "..")):
            raise ConfigurationError(f"path template {template!r} has an empty, '.' or '..' component")
    _check_unique_name(components[-1], template, _UID_CHARACTERS | {uid_dot})
    return components


def _field(name: str, template: str) -> _Field:
    tag = tag_for_keyword(name) if name.isidentifier() else None
    if tag is None:
        raise ConfigurationError(f"path template {template!r}: {{{name}}} is not a DICOM keyword")
    vr = dictionary_VR(tag)
    if any(choice.strip() in _NOT_PRINTABLE_VRS for choice in vr.split(" or ")):  # PixelData is "OB or OW"
        raise ConfigurationError(f"path template {template!r}: {name} has VR {vr}, which cannot name a path")
    return _Field(name, is_uid=vr == "UI")


def _split(tokens: Iterable[Token]) -> list[list[Token]]:
    components: list[list[Token]] = [[]]
    for token in tokens:
        if isinstance(token, _Field):
            components[-1].append(token)
            continue
        pieces = token.split("/")
        for index, piece in enumerate(pieces):
            if index:
                components.append([])
            if piece:
                components[-1].append(piece)
    return components


def _check_unique_name(name: list[Token], template: str, uid_characters: frozenset[str]) -> None:
    """The file name must give the SOPInstanceUID back: ``<prefix>{SOPInstanceUID}<literal suffix>``, where the
    prefix is empty or ends in a literal character that cannot be part of a UID. Then distinct instances always get
    distinct names, whatever the other values are."""
    positions = [i for i, token in enumerate(name) if isinstance(token, _Field) and token.keyword == "SOPInstanceUID"]
    refusal = (
        f"path template {template!r}: the file name must be unique per instance, as "
        "'[prefix]{SOPInstanceUID}[literal suffix]' where a prefix ends in a literal non-UID character such as '_'"
    )
    if not positions:
        raise ConfigurationError(refusal)
    where = positions[-1]
    suffix = name[where + 1 :]
    if any(isinstance(token, _Field) for token in suffix):
        raise ConfigurationError(refusal)
    if where > 0:
        before = name[where - 1]
        if not isinstance(before, str) or before[-1] in uid_characters:
            raise ConfigurationError(refusal)


STUDY_SERIES = PathTemplate("{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm")
FLAT = PathTemplate("{SOPInstanceUID}.dcm")
DICOMTROLLEY_STUDY_SERIES = PathTemplate("{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}", uid_dot="_")
DICOMTROLLEY_FLAT = PathTemplate("{SOPInstanceUID}", uid_dot="_")
