"""Writing DICOM instances to disk: atomically, confined to the output directory, never twice.

Layouts (see :mod:`trolley_tasks.storage.layouts` for the path rules):

- :class:`StorageDir` (the default): ``<out>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``;
- :class:`FlatStorageDir`: ``<out>/<SOPInstanceUID>.dcm``;
- :class:`TemplateStorage`: any template over DICOM keywords;
- a subclass of :class:`DICOMDiskStorage` that overrides ``save(dataset, path)``, as in dicomtrolley.

How a file is written (:meth:`DICOMDiskStorage.save_raw`, the engine's path):

1. the payload is streamed, chunk by chunk, to ``<out>/.trolley/tmp/.trolley-tmp-<random>`` and fsynced;
2. its header is parsed without pixel data (:func:`trolley_tasks.formats.part10.read_part10_header`): it must be a whole
   Part 10 file whose SOPInstanceUID is the one asked for, else the bytes go to ``<out>/quarantine/<UID>.bad`` and
   :class:`QuarantinedPayloadError` is raised;
3. the final path is built from the layout and checked to lie inside ``<out>``;
4. an identical file already there is left alone (``already_present``); otherwise ``os.replace`` puts the new file
   under its final name in one step and the directory is fsynced.

A crash at any point leaves either the old file, the new file, or no file under the final name, never half a file;
stray temp files are removed by :func:`clean_temp_files`.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset

from trolley_tasks.core import InstanceReference
from trolley_tasks.downloaders.base import RawPayload
from trolley_tasks.errors import ConfigurationError, PayloadInvalidError, UnsafePathError
from trolley_tasks.formats.part10 import FileHeader, dataset_value, read_part10_header
from trolley_tasks.storage.durable import TEMP_PREFIX, Committer, commit_now, fsync_path, replace
from trolley_tasks.storage.layouts import PathTemplate, path_component

logger = logging.getLogger("trolley.storage")

WORK_DIR = ".trolley"
TEMP_DIR = f"{WORK_DIR}/tmp"
QUARANTINE_DIR = "quarantine"
STALE_TEMP_SECONDS = 3600.0
_COMPARE_CHUNK = 1024 * 1024

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SaveResult:
    """What a save did.

    Attributes
    ----------
    path
        The final file.
    size
        Its size in bytes.
    already_present
        An identical file (same size, same bytes) was already there and was not touched.
    replaced
        A different file was there and was replaced, atomically, by the new one.
    """

    path: Path
    size: int
    already_present: bool = False
    replaced: bool = False


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
        with _TempFile(root) as temp:
            try:
                dataset.save_as(temp.handle, enforce_file_format=True)
            except (AttributeError, ValueError, TypeError, KeyError) as exc:
                uid = dataset.get("SOPInstanceUID")
                raise PayloadInvalidError(f"dataset {uid} cannot be written as a DICOM file: {exc}") from exc
            temp.finish()
            return _commit(temp, final, root)

    def save_raw(
        self,
        reference: InstanceReference,
        payload: RawPayload,
        path: PathLike | None = None,
        *,
        committer: Committer | None = None,
    ) -> SaveResult:
        """Write one instance's bytes as they came, after checking them. The engine's fast path.

        ``payload`` (bytes, or an iterator of chunks) is streamed to disk and never joined in memory. The three UIDs
        in the path come from ``reference``, so that :meth:`existing_valid` finds the file again; other keywords
        come from the file's header.

        Raises
        ------
        QuarantinedPayloadError
            Not a whole DICOM Part 10 file, or another SOPInstanceUID than ``reference``'s. The bytes are kept in
            ``<out>/quarantine/<SOPInstanceUID>.bad`` (overwritten per instance), given as ``quarantine_path``.
        UnsafePathError
            A value used in the path would escape the output directory. Nothing is written.
        TrolleyError
            Whatever the payload iterator raises (a broken stream); the temp file is removed.

        With a ``committer`` (:class:`trolley_tasks.storage.durable.Committer`), the fsync and the rename run in the
        background and the file is under its final name only once ``committer.flush()`` returned without naming
        ``reference.instance_uid``; the engine uses it to overlap disk waits with the next instance's download.
        """
        root = self._root(path)
        template = self._template()
        with _TempFile(root) as temp:
            chunks = (payload,) if isinstance(payload, bytes | bytearray | memoryview) else payload
            for chunk in chunks:
                temp.handle.write(chunk)
            temp.finish()
            try:
                dataset = read_part10_header(temp.path, template.keywords)
                _check_identity(dataset, reference)
            except PayloadInvalidError as exc:
                target = _quarantine(temp.path, root, reference)
                raise QuarantinedPayloadError(exc.message, quarantine_path=target, reference=reference) from exc

            def lookup(keyword: str) -> object:
                return _reference_value(reference, keyword) or _dataset_value(dataset, keyword)

            final = self._confined(root, template.render(lookup))
            return _commit(temp, final, root, committer, reference.instance_uid)

    def reference_path(self, reference: InstanceReference, path: PathLike | None = None) -> Path | None:
        """The final path of ``reference``, or None when the layout needs attributes from the file itself (a
        template using PatientID, say): then only the engine's ledger knows whether the instance is done."""
        template = self._template()
        if template.needs_dataset:
            return None
        return self._confined(self._root(path), template.render(lambda kw: _reference_value(reference, kw)))

    def existing_valid(self, reference: InstanceReference, path: PathLike | None = None) -> SaveResult | None:
        """A SaveResult (``already_present``) when a valid file for ``reference`` is already in place, else None.

        Lets the engine count an instance as done without fetching it. Valid means: a whole Part 10 file (see
        :func:`read_part10_header`) holding that SOPInstanceUID. Always None when :meth:`reference_path` is None.
        """
        final = self.reference_path(reference, path)
        if final is None:
            return None
        try:
            size = final.stat().st_size
            dataset = read_part10_header(final)
        except FileNotFoundError:
            return None
        except PayloadInvalidError as exc:
            logger.warning("existing file %s is not valid (%s); it will be fetched again", final, exc.message)
            return None
        if dataset.get("SOPInstanceUID") != reference.instance_uid:
            logger.warning("existing file %s holds another SOPInstanceUID; it will be fetched again", final)
            return None
        return SaveResult(final, size, already_present=True)

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
        if not _directory_inside(root, final.parent) or final.is_symlink():
            raise UnsafePathError(f"{relative} would be written outside the output directory {root}")
        return final


@functools.lru_cache(maxsize=4096)
def _directory_inside(root: Path, directory: Path) -> bool:
    """True when ``directory`` resolves inside ``root``: path components are sanitized, so only a symlink could lead
    out. Cached per directory, since a series' hundreds of files share one (resolving walks every component)."""
    resolved_root = root.resolve()
    return os.path.commonpath([resolved_root, directory.resolve()]) == str(resolved_root)


class TemplateStorage(DICOMDiskStorage):
    """Files laid out by a template over DICOM keywords (see :mod:`trolley_tasks.storage.layouts`).

    >>> TemplateStorage("{PatientID}/{StudyDate}_{AccessionNumber}/{Modality}_{SeriesInstanceUID}/{SOPInstanceUID}.dcm")
    """

    def __init__(self, template: str, path: PathLike | None = None) -> None:
        super().__init__(path)
        self.template = PathTemplate(template)


class StorageDir(TemplateStorage):
    """``<out>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: the default layout."""

    def __init__(self, path: PathLike | None = None) -> None:
        super().__init__("{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm", path)


class FlatStorageDir(TemplateStorage):
    """``<out>/<SOPInstanceUID>.dcm``: every file in one folder."""

    def __init__(self, path: PathLike | None = None) -> None:
        super().__init__("{SOPInstanceUID}.dcm", path)


def clean_temp_files(root: PathLike, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Remove temp files left in ``<root>/.trolley/tmp`` by a crash, if untouched for ``older_than`` seconds.

    A temp file being written is touched continuously, so the age keeps this safe while other workers write to the
    same directory. Returns how many were removed.
    """
    directory = Path(root) / TEMP_DIR
    if not directory.is_dir():
        return 0
    removed = 0
    limit = time.time() - older_than
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX) and entry.stat(follow_symlinks=False).st_mtime <= limit:
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------------- internals


class _TempFile:
    """A new file in ``<root>/.trolley/tmp`` (same filesystem as the output), removed on exit unless renamed."""

    def __init__(self, root: Path) -> None:
        directory = root / TEMP_DIR
        self.path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        # os.open with 0o666, not mkstemp: the final files get the user's umask, as any file they write would.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(self.path, flags, 0o666)
        except FileNotFoundError:  # first file under this output (the folder is made once, not per file)
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o666)
        self.handle: BinaryIO = os.fdopen(fd, "wb")

        self.detached = False

    def finish(self) -> None:
        """All bytes written; the file is fsynced when it is committed (:mod:`trolley_tasks.storage.durable`)."""
        self.handle.close()

    def detach(self) -> Path:
        """Hand the file over (to a background commit): it is no longer removed on exit."""
        self.detached = True
        return self.path

    def __enter__(self) -> _TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
        if not self.detached:
            self.path.unlink(missing_ok=True)


def _defining_class(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def _reference_value(reference: InstanceReference, keyword: str) -> str | None:
    return {
        "StudyInstanceUID": reference.study_uid,
        "SeriesInstanceUID": reference.series_uid,
        "SOPInstanceUID": reference.instance_uid,
    }.get(keyword)


def _dataset_value(dataset: Dataset | FileHeader, keyword: str) -> object:
    if isinstance(dataset, FileHeader):
        return dataset.get(keyword)
    return dataset_value(dataset, keyword)


def _check_identity(dataset: FileHeader, reference: InstanceReference) -> None:
    uid = dataset.get("SOPInstanceUID")
    if uid != reference.instance_uid:
        raise PayloadInvalidError(f"file holds SOPInstanceUID {str(uid)[:80]!r}, not {reference.instance_uid}")
    for keyword, expected in (("StudyInstanceUID", reference.study_uid), ("SeriesInstanceUID", reference.series_uid)):
        if keyword not in dataset:  # type 1 in every composite IOD (PS3.3 C.7.2.1, C.7.3.1): a cut file
            raise PayloadInvalidError(f"file has no {keyword}: not a whole composite instance (truncated?)")
        if dataset.get(keyword) != expected:
            logger.warning(
                "%s: file says %s %s; stored under the reference's", reference, keyword, dataset.get(keyword)
            )


def _quarantine(temp: Path, root: Path, reference: InstanceReference) -> Path:
    directory = root / QUARANTINE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{path_component(reference.instance_uid, 'SOPInstanceUID', is_uid=True)}.bad"
    replace(temp, target)
    return target


def _commit(temp: _TempFile, final: Path, root: Path, committer: Committer | None = None, key: str = "") -> SaveResult:
    size = temp.path.stat().st_size
    _make_dirs(final.parent, root)
    try:
        existing = final.stat().st_size
    except FileNotFoundError:
        existing = None
    if existing == size and _same_bytes(temp.path, final):
        return SaveResult(final, size, already_present=True)
    if committer is None:
        commit_now(temp.path, final)
    else:
        committer.submit(key, temp.detach(), final)
    if existing is not None:
        logger.warning("replaced %s: the server sent different bytes than the file already there", final)
    return SaveResult(final, size, replaced=existing is not None)


def _make_dirs(directory: Path, root: Path) -> None:
    """Create ``directory`` and fsync the parent of each new level, so that a renamed file's path survives a crash."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    current = directory
    while not current.is_dir() and current != root:
        missing.append(current)
        current = current.parent
    for level in reversed(missing):
        try:
            level.mkdir()
        except FileExistsError:
            continue  # another worker made it
        _fsync_dir(level.parent)
    directory.mkdir(parents=True, exist_ok=True)


def _fsync_dir(directory: Path) -> None:
    fsync_path(directory)


def _same_bytes(first: Path, second: Path) -> bool:
    with open(first, "rb") as a, open(second, "rb") as b:
        return all(x == y for x, y in zip(_chunks(a), _chunks(b), strict=False)) and not a.read(1) and not b.read(1)


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: handle.read(_COMPARE_CHUNK), b"")
