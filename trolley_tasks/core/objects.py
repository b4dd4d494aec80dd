"""The DICOM object model: levels, UIDs, references and the study -> series -> instance tree.

- :class:`DICOMObjectLevels` (ordered: STUDY > SERIES > INSTANCE) and :class:`QueryLevels`.
- Frozen, hashable references: :class:`StudyReference`, :class:`SeriesReference`, :class:`InstanceReference`.
  Their UIDs are validated on creation, so a reference that exists is safe to put in a path or a URL.
- The object tree that searchers return: :class:`Study`, :class:`Series`, :class:`Instance`, each with ``.data``
  (a pydicom Dataset of what the server returned) and parent/child links.
- :func:`to_references` and its kin, which downloaders use to ask "what exactly am I to fetch?", and
  :func:`group_by_series`, which batches instance references the way series-level requests need them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import ClassVar

from pydicom import Dataset

from trolley_tasks.errors import InvalidUIDError, NoReferencesFoundError

# --------------------------------------------------------------------------------------------------------------------
# UIDs

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` follows the DICOM UID grammar (PS3.5 section 9.1): digits and dots, at most 64 chars.

    Components with a leading zero (``1.02``) break the letter of PS3.5 but are common in the field; we accept them,
    because refusing them would make real studies impossible to export. They are still safe in paths and URLs.
    """
    return isinstance(value, str) and len(value) <= UID_MAX_LENGTH and _UID_RE.fullmatch(value) is not None


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise :class:`InvalidUIDError` naming ``what``."""
    if not is_valid_uid(value):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80] + "...")
        raise InvalidUIDError(
            f"invalid {what} {shown}: a DICOM UID is digits and dots, at most {UID_MAX_LENGTH} characters"
        )
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------------------------------------------------
# Levels


class DICOMObjectLevels(IntEnum):
    """Where an object sits in the study -> series -> instance tree. Ordered: STUDY is the highest level.

    This is a property of an object; :class:`QueryLevels` is a property of a query.
    """

    INSTANCE = 1
    SERIES = 2
    STUDY = 3


class QueryLevels(StrEnum):
    """How deep a search goes: study information only, or also series, or also instances."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    INSTANCE = "INSTANCE"

    @classmethod
    def from_object_level(cls, level: DICOMObjectLevels) -> QueryLevels:
        """The query depth that returns objects of ``level``."""
        return {
            DICOMObjectLevels.STUDY: cls.STUDY,
            DICOMObjectLevels.SERIES: cls.SERIES,
            DICOMObjectLevels.INSTANCE: cls.INSTANCE,
        }[DICOMObjectLevels(level)]

    def to_object_level(self) -> DICOMObjectLevels:
        """The deepest object level a query at this depth returns."""
        return {
            QueryLevels.STUDY: DICOMObjectLevels.STUDY,
            QueryLevels.SERIES: DICOMObjectLevels.SERIES,
            QueryLevels.INSTANCE: DICOMObjectLevels.INSTANCE,
        }[self]


# --------------------------------------------------------------------------------------------------------------------
# Downloadables and references


class DICOMObjectReference:
    """Base of the shallow references: UIDs only, no parents, children or data. Frozen and hashable."""

    level: ClassVar[DICOMObjectLevels]

    def contained_references(self, max_level: DICOMObjectLevels) -> tuple[DICOMObjectReference, ...]:
        """A reference yields itself when it is of ``max_level`` or lower; it cannot be broken down further."""
        if self.level <= max_level:
            return (self,)
        raise NoReferencesFoundError(
            f"{self} is a {self.level.name} reference; {max_level.name}-level references need a search first",
            reference=self,
        )


@dataclass(frozen=True, order=True)
class StudyReference(DICOMObjectReference):
    """A study, by StudyInstanceUID."""

    study_uid: str
    level: ClassVar[DICOMObjectLevels] = DICOMObjectLevels.STUDY

    def __post_init__(self) -> None:
        validate_uid(self.study_uid, "StudyInstanceUID")

    def __str__(self) -> str:
        return f"study {self.study_uid}"


@dataclass(frozen=True, order=True)
class SeriesReference(DICOMObjectReference):
    """A series of a study."""

    study_uid: str
    series_uid: str
    level: ClassVar[DICOMObjectLevels] = DICOMObjectLevels.SERIES

    def __post_init__(self) -> None:
        validate_uid(self.study_uid, "StudyInstanceUID")
        validate_uid(self.series_uid, "SeriesInstanceUID")

    def study(self) -> StudyReference:
        return StudyReference(self.study_uid)

    def __str__(self) -> str:
        return f"series {self.series_uid} (study {self.study_uid})"


@dataclass(frozen=True, order=True)
class InstanceReference(DICOMObjectReference):
    """Everything needed to fetch one SOP instance."""

    study_uid: str
    series_uid: str
    instance_uid: str
    level: ClassVar[DICOMObjectLevels] = DICOMObjectLevels.INSTANCE

    def __post_init__(self) -> None:
        validate_uid(self.study_uid, "StudyInstanceUID")
        validate_uid(self.series_uid, "SeriesInstanceUID")
        validate_uid(self.instance_uid, "SOPInstanceUID")

    def series(self) -> SeriesReference:
        return SeriesReference(self.study_uid, self.series_uid)

    def __str__(self) -> str:
        return f"instance {self.instance_uid} (series {self.series_uid}, study {self.study_uid})"


# --------------------------------------------------------------------------------------------------------------------
# The object tree


@dataclass(eq=False)
class DICOMObject:
    """An object in the DICOM tree, as a searcher returns it. Base of Study, Series and Instance.

    ``data`` holds the attributes the server returned for this object (which ones depends on the query level, the
    include fields and the server).
    """

    uid: str
    data: Dataset = field(default_factory=Dataset, repr=False)
    level: ClassVar[DICOMObjectLevels]

    def __post_init__(self) -> None:
        validate_uid(self.uid, f"{self.level.name.title()} UID")

    def children(self) -> Sequence[DICOMObject]:
        """Direct children, or an empty sequence."""
        return ()

    def root(self) -> DICOMObject:
        """The study this object belongs to (itself for a study; the topmost parent known for a detached one)."""
        return self

    def dump_content(self) -> str:
        """This object's ``.data`` and that of everything below it, one dataset after the other, for a quick look
        in a script (dicomtrolley has it on MINT studies; here every object of any searcher has it)."""
        return "\n".join([str(self.data), *(child.dump_content() for child in self.children())])

    def all_instances(self) -> list[Instance]:
        raise NotImplementedError

    def all_series(self) -> list[Series]:
        raise NotImplementedError

    def reference(self) -> DICOMObjectReference:
        raise NotImplementedError

    def max_object_depth(self) -> DICOMObjectLevels:
        """The deepest level this object holds information for: an instance-level study holds INSTANCE."""
        depths = [child.max_object_depth() for child in self.children()]
        return min(depths, default=self.level)

    def contained_references(self, max_level: DICOMObjectLevels) -> tuple[DICOMObjectReference, ...]:
        """References of ``max_level`` or lower contained in this object.

        An object of ``max_level`` or lower returns its own reference. A higher object is broken down into its
        children; if any child has nothing to give at that level (a study searched only at STUDY depth, or a series
        without its instances), :class:`NoReferencesFoundError` is raised rather than quietly dropping that part.

        >>> instance.contained_references(max_level=DICOMObjectLevels.SERIES)   # (InstanceReference,)
        >>> study.contained_references(max_level=DICOMObjectLevels.SERIES)      # (SeriesReference, ...)
        """
        if self.level <= max_level:
            return (self.reference(),)
        children = self.children()
        if not children:
            raise NoReferencesFoundError(
                f"{self.level.name.lower()} {self.uid} holds no {max_level.name.lower()}-level information; "
                "search it at a deeper query level first",
                reference=self.reference(),
            )
        refs: list[DICOMObjectReference] = []
        for child in children:
            refs.extend(child.contained_references(max_level))
        return tuple(refs)


@dataclass(eq=False)
class Instance(DICOMObject):
    """One SOP instance."""

    parent: Series | None = field(default=None, repr=False)
    level: ClassVar[DICOMObjectLevels] = DICOMObjectLevels.INSTANCE

    def all_instances(self) -> list[Instance]:
        return [self]

    def all_series(self) -> list[Series]:
        return [self.parent] if self.parent is not None else []

    def root(self) -> DICOMObject:
        return self.parent.root() if self.parent is not None else self

    def reference(self) -> InstanceReference:
        if self.parent is None or self.parent.parent is None:
            raise NoReferencesFoundError(f"instance {self.uid} has no series or study parent", reference=None)
        return InstanceReference(self.parent.parent.uid, self.parent.uid, self.uid)


@dataclass(eq=False)
class Series(DICOMObject):
    """A series and, if searched deep enough, its instances."""

    parent: Study | None = field(default=None, repr=False)
    instances: list[Instance] = field(default_factory=list, repr=False)
    level: ClassVar[DICOMObjectLevels] = DICOMObjectLevels.SERIES

    def children(self) -> Sequence[Instance]:
        return self.instances

    def all_instances(self) -> list[Instance]:
        return list(self.instances)

    def all_series(self) -> list[Series]:
        return [self]

    def root(self) -> DICOMObject:
        return self.parent if self.parent is not None else self

    def __getitem__(self, instance_uid: str) -> Instance:
        """``series["<SOPInstanceUID>"]``: :meth:`get`."""
        return self.get(instance_uid)

    def get(self, instance_uid: str) -> Instance:
        """The instance with this SOPInstanceUID; KeyError if this series does not hold it."""
        for instance in self.instances:
            if instance.uid == instance_uid:
                return instance
        raise KeyError(f"series {self.uid} holds no instance {instance_uid}")

    def add_instance(self, instance: Instance) -> Instance:
        instance.parent = self
        self.instances.append(instance)
        return instance

    def reference(self) -> SeriesReference:
        if self.parent is None:
            raise NoReferencesFoundError(f"series {self.uid} has no study parent", reference=None)
        return SeriesReference(self.parent.uid, self.uid)


@dataclass(eq=False)
class Study(DICOMObject):
    """A study and, if searched deep enough, its series and their instances."""

    series: list[Series] = field(default_factory=list, repr=False)
    level: ClassVar[DICOMObjectLevels] = DICOMObjectLevels.STUDY

    def children(self) -> Sequence[Series]:
        return self.series

    def all_instances(self) -> list[Instance]:
        return [instance for series in self.series for instance in series.instances]

    def all_series(self) -> list[Series]:
        return list(self.series)

    def __getitem__(self, series_uid: str) -> Series:
        """``study["<SeriesInstanceUID>"]``: :meth:`get`."""
        return self.get(series_uid)

    def get(self, series_uid: str) -> Series:
        """The series with this SeriesInstanceUID; KeyError if this study does not hold it."""
        for series in self.series:
            if series.uid == series_uid:
                return series
        raise KeyError(f"study {self.uid} holds no series {series_uid}")

    def add_series(self, series: Series) -> Series:
        series.parent = self
        self.series.append(series)
        return series

    def reference(self) -> StudyReference:
        return StudyReference(self.uid)


Downloadable = DICOMObject | DICOMObjectReference


def to_references(
    objects: Downloadable | Iterable[Downloadable], max_level: DICOMObjectLevels
) -> list[DICOMObjectReference]:
    """References of ``max_level`` or lower for everything in ``objects``, in order, without duplicates.

    Downloaders that cannot fetch "study X" directly call this first. It raises :class:`NoReferencesFoundError`
    where an object cannot be broken down (a StudyReference, or a study searched only at STUDY depth).
    """
    items: Iterable[Downloadable]
    items = (objects,) if isinstance(objects, DICOMObject | DICOMObjectReference) else objects
    seen: set[DICOMObjectReference] = set()
    out: list[DICOMObjectReference] = []
    for item in items:
        for ref in item.contained_references(max_level):
            if ref not in seen:
                seen.add(ref)
                out.append(ref)
    return out


def to_instance_refs(objects: Downloadable | Iterable[Downloadable]) -> list[InstanceReference]:
    """Instance references for everything in ``objects``. See :func:`to_references`."""
    return [ref for ref in to_references(objects, DICOMObjectLevels.INSTANCE) if isinstance(ref, InstanceReference)]


def to_series_level_refs(
    objects: Downloadable | Iterable[Downloadable],
) -> list[SeriesReference | InstanceReference]:
    """Series or instance references for everything in ``objects``. See :func:`to_references`."""
    return [
        ref
        for ref in to_references(objects, DICOMObjectLevels.SERIES)
        if isinstance(ref, SeriesReference | InstanceReference)
    ]


def group_by_series(references: Iterable[InstanceReference]) -> dict[SeriesReference, list[InstanceReference]]:
    """``references`` grouped by their series, series and instances in first-seen order.

    Series-level requests (WADO-RS ``/series/{uid}``, one RAD-69 document set per series, a C-GET at SERIES level)
    and the engine's fetch batches all need the same grouping; this is the one place it is written.
    """
    groups: dict[SeriesReference, list[InstanceReference]] = {}
    for reference in references:
        groups.setdefault(reference.series(), []).append(reference)
    return groups
