"""Writing DICOM instances to disk: atomically, confined to the output directory, never twice.

Layouts (see :mod:`trolley_tasks.storage.layouts` for the path rules):

- :class:`StorageDir` (Trolley's default, as in dicomtrolley): ``<out>/1_2_3/1_2_3_4/1_2_3_4_5``;
- :class:`FlatStorageDir` (dicomtrolley's): ``<out>/1_2_3_4_5``;
- :class:`DcmStorageDir` (the CLI's default): ``<out>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``;
- :class:`FlatDcmStorageDir`: ``<out>/<SOPInstanceUID>.dcm``;
- :class:`TemplateStorage`: any template over DICOM keywords;
- a subclass of :class:`DICOMDiskStorage` that overrides ``save(dataset, path)``, as in dicomtrolley.

How a file is written (:meth:`DICOMDiskStorage.save_raw`, the engine's path):

1. the payload is streamed, chunk by chunk, to ``<out>/.trolley/tmp/.trolley-tmp-<random>``
   (:class:`~trolley_tasks.storage.durable.AtomicFile`), while its header walk goes on over the chunks
   (:class:`~trolley_tasks.formats.part10.Part10Stream`: the walk the downloader started, or a new one for bytes);
   a C-MOVE arrival (:class:`~trolley_tasks.formats.part10.Part10File`) is already a file and is walked in place;
2. it must be a whole Part 10 file of the instance asked for
   (:func:`~trolley_tasks.formats.part10.check_identity`), else the bytes go to
   ``<out>/.trolley/quarantine/<UID>.bad`` and
   :class:`QuarantinedPayloadError` is raised;
3. the final path is built from the layout and checked to lie inside ``<out>``;
4. an identical file already there is left alone (``already_present``); otherwise the file is fsynced and renamed
   under its final name in one step, and the directory is fsynced (:mod:`trolley_tasks.storage.durable`).

A crash at any point leaves either the old file, the new file, or no file under the final name, never half a file;
stray temp files are removed by :func:`clean_temp_files`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import Dataset

from trolley_tasks.core import InstanceReference
from trolley_tasks.errors import ConfigurationError, PayloadInvalidError, UnsafePathError
from trolley_tasks.formats.part10 import (
    Part10File,
    Part10Header,
    Part10Stream,
    RawPayload,
    check_identity,
    dataset_value,
    read_part10_header,
)
from trolley_tasks.storage.confine import confined_directory
from trolley_tasks.storage.durable import AtomicFile, Committer, remove_stale_temp_files, replace
from trolley_tasks.storage.layouts import (
    DICOMTROLLEY_FLAT,
    DICOMTROLLEY_STUDY_SERIES,
    FLAT,
    STUDY_SERIES,
    PathTemplate,
    path_component,
)
from trolley_tasks.storage.placement import SaveResult, place, place_file

logger = logging.getLogger("trolley.storage")

WORK_DIR = ".trolley"
TEMP_DIR = f"{WORK_DIR}/tmp"
QUARANTINE_DIR = f"{WORK_DIR}/quarantine"
"""Inside the hidden work folder: the export tree holds the export (instances and the report), nothing a verifier or
a pipeline walking it would take for data."""
STALE_TEMP_SECONDS = 3600.0

PathLike = str | os.PathLike[str]


class QuarantinedPayloadError(PayloadInvalidError):
    """The payload is not the DICOM instance asked for; its bytes were kept at ``quarantine_path`` for a person."""

    def __init__(self, message: str, *, quarantine_path: Path, **kwargs: Any) -> None:
        super().__init__(f"{message}; bytes kept in {quarantine_path}", **kwargs)
        self.quarantine_path = quarantine_path


class DICOMDiskStorage:
    """Base of the storages. Subclasses give a layout (``template``) or override :meth:`save` entirely.

    Parameters
    ----------
    path
        Default output directory, used when :meth:`save` / :meth:`save_raw` are called without one
        (``FlatStorageDir(path='/tmp')`` in the seeds). ``Trolley.download(objects, output_dir)`` always passes one.
    """

    template: PathTemplate | None = None
    also_recognised: tuple[PathTemplate, ...] = ()
    """Other layouts whose files :meth:`existing_valid` accepts as already present (dotted <-> dicomtrolley)."""

    def __init__(self, path: PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None

    def __repr__(self) -> str:
        layout = self.template.template if self.template else "custom"
        return f"{type(self).__name__}(layout={layout!r}, path={str(self.path) if self.path else None!r})"

    # ---------------------------------------------------------------------------------------------- public API

    def supports_raw(self) -> bool:
        """True when :meth:`save_raw` writes what :meth:`save` would: the class has a layout and did not override
        ``save`` alone. A custom ``save`` (the seeds' ``MyStorage``) must be given datasets instead."""
        owner_save = _defining_class(type(self), "save")
        owner_raw = _defining_class(type(self), "save_raw")
        return self.template is not None and issubclass(owner_raw, owner_save)

    def save(self, dataset: Dataset, path: PathLike | None = None) -> SaveResult:
        """Write ``dataset`` as a Part 10 file under ``path`` (or the default directory), atomically."""
        root = self._root(path)
        template = self._template()
        final = self._confined(root, template.render(lambda keyword: _dataset_value(dataset, keyword)))
        with AtomicFile(_work_dir(root, TEMP_DIR)) as temp:
            try:
                dataset.save_as(temp.handle, enforce_file_format=True)
            except (AttributeError, ValueError, TypeError, KeyError) as exc:
                uid = dataset.get("SOPInstanceUID")
                raise PayloadInvalidError(f"dataset {uid} cannot be written as a DICOM file: {exc}") from exc
            temp.close()
            return place(temp, final, root)

    def save_raw(
        self,
        reference: InstanceReference,
        payload: RawPayload,
        path: PathLike | None = None,
        *,
        committer: Committer | None = None,
    ) -> SaveResult:
        """Write one instance's bytes as they came, after checking them. The engine's fast path.

        ``payload`` is streamed to disk and never joined in memory; its header is walked once, as it passes (see
        the module docstring). A :class:`~trolley_tasks.formats.part10.Part10File` is renamed into place instead
        (copied only when it lies on another filesystem). The three UIDs in the path come from ``reference``, so
        that :meth:`existing_valid` finds the file again; other keywords come from the file's header.

        Raises
        ------
        QuarantinedPayloadError
            Not a whole DICOM Part 10 file, or another instance than ``reference``. The bytes are kept in
            ``<out>/.trolley/quarantine/<SOPInstanceUID>.bad`` (overwritten per instance), given as
            ``quarantine_path``.
        UnsafePathError
            A value used in the path would escape the output directory. Nothing is written.
        TrolleyError
            Whatever the payload iterator raises (a broken stream); the temp file is removed, or, when the stream
            broke as invalid with bytes already written, kept in quarantine like a bad payload.

        With a ``committer`` (:class:`trolley_tasks.storage.durable.Committer`), the sync and the rename wait for
        the batch: the file is under its final name only once ``committer.flush()`` returned without naming
        ``reference.instance_uid``; the engine syncs a batch's files together (one ``syncfs``, not an fsync each).
        """
        root = self._root(path)
        if isinstance(payload, Part10File):
            return self._save_file(reference, payload.path, root, committer)
        stream = Part10Stream.of(payload)
        with AtomicFile(_work_dir(root, TEMP_DIR)) as temp:
            try:
                for chunk in stream:
                    temp.handle.write(chunk)
            except PayloadInvalidError:
                # the stream broke inside this instance (a truncated part): keep what came, from the temp file
                # already on disk (never from memory), for a person to look at; the caller retries the stream
                temp.close()
                if temp.path.stat().st_size:
                    _quarantine(temp.detach(), root, reference)
                raise
            temp.close()
            try:
                header = stream.finish(temp.path)
                check_identity(header, reference)
            except PayloadInvalidError as exc:
                target = _quarantine(temp.detach(), root, reference)
                raise QuarantinedPayloadError(exc.message, quarantine_path=target, reference=reference) from exc
            return place(temp, self._final(reference, header, root), root, committer, reference.instance_uid)

    def _save_file(
        self, reference: InstanceReference, source: Path, root: Path, committer: Committer | None
    ) -> SaveResult:
        """:meth:`save_raw` for a file already on disk: checked in place, then renamed (never read into memory)."""
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
        try:
            header = read_part10_header(source)
            check_identity(header, reference)
        except PayloadInvalidError as exc:
            target = _quarantine(source, root, reference)
            raise QuarantinedPayloadError(exc.message, quarantine_path=target, reference=reference) from exc
        result = place_file(source, self._final(reference, header, root), root, committer, reference.instance_uid)
        if result.already_present:
            source.unlink(missing_ok=True)
        return result

    def _final(self, reference: InstanceReference, header: Part10Header, root: Path) -> Path:
        """The final path: the UIDs from the reference, any other keyword from the file's header."""

        def lookup(keyword: str) -> object:
            return _reference_value(reference, keyword) or header.get(keyword)

        return self._confined(root, self._template().render(lookup))

    def relative_reference_path(self, reference: InstanceReference) -> Path | None:
        """Where ``reference`` goes, relative to the output directory, by the layout alone: string work, no
        filesystem call (the report lists a million of them). None when the layout needs the file's attributes."""
        template = self._template()
        if template.needs_dataset:
            return None
        return Path(template.render(lambda kw: _reference_value(reference, kw)))

    def reference_path(
        self, reference: InstanceReference, path: PathLike | None = None, template: PathTemplate | None = None
    ) -> Path | None:
        """The final path of ``reference`` (under ``template``, by default this storage's own), or None when the
        layout needs attributes from the file itself (a template using PatientID, say): then only the engine's
        ledger knows whether the instance is done."""
        template = template if template is not None else self._template()
        if template.needs_dataset:
            return None
        return self._confined(self._root(path), template.render(lambda kw: _reference_value(reference, kw)))

    def existing_valid(self, reference: InstanceReference, path: PathLike | None = None) -> SaveResult | None:
        """A SaveResult (``already_present``) when a valid file for ``reference`` is already in place, else None.

        Lets the engine count an instance as done without fetching it. Valid means: a whole Part 10 file (see
        :func:`read_part10_header`) of that instance (:func:`check_identity`). The layouts in
        :attr:`also_recognised` are looked at too, so that a re-export into a folder that dicomtrolley filled (or
        the other way round) fetches nothing again; the file found is left where it is. Always None when
        :meth:`reference_path` is None.
        """
        return self._existing(reference, self._root(path), self._uid_layouts())

    def existing_valid_many(
        self, references: Iterable[InstanceReference], path: PathLike | None = None
    ) -> dict[str, SaveResult]:
        """:meth:`existing_valid` for each of ``references``: the files found, by SOPInstanceUID.

        A layout whose folders are named by the study and the series alone is looked into only where the series'
        folder is there: one ``lstat`` for a series of a fresh export, where :meth:`existing_valid` renders the
        path and calls ``lstat`` for every instance and layout (40 to 60 µs an instance with the two layouts of the
        default storage, about 3% of the engine's CPU for WADO-RS; 3 µs by batch; docs/performance.md).
        """
        root, layouts = self._root(path), self._uid_layouts()
        folders: dict[tuple[int, str, str], bool] = {}
        found: dict[str, SaveResult] = {}
        for reference in references:
            usable = []
            for index, template in enumerate(layouts):
                if template.folders_by_series:
                    key = (index, reference.study_uid, reference.series_uid)
                    if key not in folders:
                        folder = template.render(functools.partial(_reference_value, reference)).parent
                        folders[key] = os.path.lexists(root / folder)
                    if not folders[key]:
                        continue
                usable.append(template)
            result = self._existing(reference, root, usable)
            if result is not None:
                found[reference.instance_uid] = result
        return found

    def _uid_layouts(self) -> list[PathTemplate]:
        """This storage's layout and those it also recognises, where the three UIDs alone place a file."""
        return [template for template in (self._template(), *self.also_recognised) if not template.needs_dataset]

    def _existing(self, reference: InstanceReference, root: Path, layouts: Iterable[PathTemplate]) -> SaveResult | None:
        for template in layouts:
            relative = template.render(lambda kw: _reference_value(reference, kw))
            if not os.path.lexists(root / relative):
                # nothing there (a fresh export, a layout not in use): nothing to confine or read. Confining first
                # resolved every component of a directory not made yet, on every call: 15% of a WADO-RS fetch
                # task's samples (py-spy, the bench's cohort), for a file that was not there.
                continue
            final = self._confined(root, relative)
            try:
                size = final.stat().st_size
                check_identity(read_part10_header(final), reference)
            except FileNotFoundError:
                continue
            except PayloadInvalidError as exc:
                logger.warning("existing file %s is not valid (%s); it will be fetched again", final, exc.message)
                continue
            return SaveResult(final, size, already_present=True)
        return None

    def stored_size(self, reference: InstanceReference, path: PathLike | None = None) -> int | None:
        """The size of the file that stands for ``reference`` where the layouts put it (this storage's, then
        :attr:`also_recognised`, as :meth:`existing_valid` looks), or None when none is there. One ``stat`` per
        layout and no read: the engine asks it on a re-run for every instance it counted done. Layouts that need
        the file's attributes are not looked at."""
        root = self._root(path)
        for template in self._uid_layouts():
            try:
                return (root / template.render(lambda kw: _reference_value(reference, kw))).stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    # ------------------------------------------------------------------------------------------------- helpers

    def _template(self) -> PathTemplate:
        if self.template is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no layout: use StorageDir, FlatStorageDir or TemplateStorage, "
                "or override save()"
            )
        return self.template

    def _root(self, path: PathLike | None) -> Path:
        root = path if path is not None else self.path
        if root is None:
            raise ConfigurationError(f"{type(self).__name__}: no output directory given")
        return Path(root).absolute()

    @staticmethod
    def _confined(root: Path, relative: os.PathLike[str]) -> Path:
        final = root / relative
        confined_directory(root, final.parent)
        if final.is_symlink():
            raise UnsafePathError(f"{relative} would be written outside the output directory {root}")
        return final


class TemplateStorage(DICOMDiskStorage):
    """Files laid out by a template over DICOM keywords (see :mod:`trolley_tasks.storage.layouts`).

    >>> TemplateStorage("{PatientID}/{StudyDate}_{AccessionNumber}/{Modality}_{SeriesInstanceUID}/{SOPInstanceUID}.dcm")
    """

    def __init__(self, template: str | PathTemplate, path: PathLike | None = None) -> None:
        super().__init__(path)
        self.template = template if isinstance(template, PathTemplate) else PathTemplate(template)


class StorageDir(TemplateStorage):
    """dicomtrolley's layout, under its name: ``<out>/1_2_3/1_2_3_4/1_2_3_4_5`` (Study/Series/SOPInstanceUID, dots
    as underscores, no extension), so that a script moved from dicomtrolley writes the same files.

    Files of :class:`DcmStorageDir` (our dotted ``.dcm`` layout) count as already present too.
    """

    also_recognised = (STUDY_SERIES,)

    def __init__(self, path: PathLike | None = None) -> None:
        super().__init__(DICOMTROLLEY_STUDY_SERIES, path)


class FlatStorageDir(TemplateStorage):
    """dicomtrolley's flat layout, under its name: ``<out>/1_2_3_4_5``. Files of :class:`FlatDcmStorageDir` count
    as already present too."""

    also_recognised = (FLAT,)

    def __init__(self, path: PathLike | None = None) -> None:
        super().__init__(DICOMTROLLEY_FLAT, path)


class DcmStorageDir(TemplateStorage):
    """``<out>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: the CLI's default (``study-series``).

    Dotted UIDs and an extension that file browsers and viewers recognise; dicomtrolley's names (:class:`StorageDir`)
    count as already present.
    """

    also_recognised = (DICOMTROLLEY_STUDY_SERIES,)

    def __init__(self, path: PathLike | None = None) -> None:
        super().__init__(STUDY_SERIES, path)


class FlatDcmStorageDir(TemplateStorage):
    """``<out>/<SOPInstanceUID>.dcm``: every file in one folder (the CLI's ``flat``); dicomtrolley's flat names
    (:class:`FlatStorageDir`) count as already present."""

    also_recognised = (DICOMTROLLEY_FLAT,)

    def __init__(self, path: PathLike | None = None) -> None:
        super().__init__(FLAT, path)


def clean_temp_files(root: PathLike, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Remove temp files left in ``<root>/.trolley/tmp`` by a crash, if untouched for ``older_than`` seconds
    (:func:`~trolley_tasks.storage.durable.remove_stale_temp_files`). Returns how many were removed."""
    return remove_stale_temp_files(Path(root) / TEMP_DIR, older_than)


def _defining_class(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def _reference_value(reference: InstanceReference, keyword: str) -> str | None:
    return {
        "StudyInstanceUID": reference.study_uid,
        "SeriesInstanceUID": reference.series_uid,
        "SOPInstanceUID": reference.instance_uid,
    }.get(keyword)


def _dataset_value(dataset: Dataset, keyword: str) -> object:
    return dataset_value(dataset, keyword)


def _work_dir(root: Path, name: str) -> Path:
    """``<root>/.trolley/tmp`` or ``.../quarantine``, made if missing and checked to lie inside ``root`` (a
    ``.trolley`` swapped for a symlink must not carry instance bytes elsewhere)."""
    directory = root / name
    if not directory.is_dir():  # per instance: a stat, where a mkdir of an existing folder locked its parent
        directory.mkdir(parents=True, exist_ok=True)
    return confined_directory(root, directory)


def _quarantine(temp: Path, root: Path, reference: InstanceReference) -> Path:
    directory = _work_dir(root, QUARANTINE_DIR)
    target = directory / f"{path_component(reference.instance_uid, 'SOPInstanceUID', is_uid=True)}.bad"
    replace(temp, target)
    return target
