"""The in-process facade: search with a searcher, fetch with a downloader, write with a storage. No Celery.

This is dicomtrolley's ``Trolley``, so that its usage examples run as written (up to the import path)::

    trolley = Trolley(searcher=QidoRS(session, url), downloader=WadoRS(session, url))
    studies = trolley.find_studies(Query(PatientName="B*"))
    trolley.download(studies[0], output_dir="/tmp/trolley")

Downloaders that can only fetch series or instances raise :class:`NonSeriesParameterError` or
:class:`NonInstanceParameterError` before yielding anything; the trolley then asks the searcher for the missing
levels (one ``find_study_by_id`` per study) and asks the downloader again: dicomtrolley's "dance". The engine does
the same in its expansion task, distributed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydicom import Dataset

from trolley_tasks.core import (
    DICOMObject,
    DICOMObjectLevels,
    DICOMObjectReference,
    Downloadable,
    InstanceReference,
    Query,
    QueryLevels,
    Series,
    SeriesReference,
    Study,
    StudyReference,
    group_by_series,
    to_references,
)
from trolley_tasks.downloaders.base import Downloader
from trolley_tasks.errors import (
    NonInstanceParameterError,
    NonSeriesParameterError,
    NoReferencesFoundError,
    NotFoundError,
    UsageError,
)
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.storage.disk import DICOMDiskStorage, SaveResult, StorageDir, clean_temp_files
from trolley_tasks.storage.writable import make_writable

logger = logging.getLogger("trolley.trolley")

T = TypeVar("T")


class Trolley:
    """Find and download DICOM objects in one process.

    Parameters
    ----------
    searcher
        Any :class:`~trolley_tasks.searchers.base.Searcher` (QidoRS, Mint, DICOMQR, WadoRSMetadata, CachedSearcher).
    downloader
        Any :class:`~trolley_tasks.downloaders.base.Downloader` (WadoRS, WadoURI, Rad69, DICOMQR).
    storage
        Where and how files are written; :class:`~trolley_tasks.storage.disk.StorageDir` by default.
    """

    def __init__(self, searcher: Searcher, downloader: Downloader, storage: DICOMDiskStorage | None = None) -> None:
        self.searcher = searcher
        self.downloader = downloader
        self.storage = storage if storage is not None else StorageDir()

    def __repr__(self) -> str:
        return f"Trolley(searcher={self.searcher!r}, downloader={self.downloader!r}, storage={self.storage!r})"

    def find_studies(self, query: Query) -> list[Study]:
        """Every study matching ``query``, filled to ``query.query_level``."""
        return self.searcher.find_studies(query)

    def find_study(self, query: Query) -> Study:
        """The one study matching ``query``; StudyNotFoundError or AmbiguousResultError otherwise."""
        return self.searcher.find_study(query)

    def download(
        self,
        objects: Downloadable | Iterable[Downloadable],
        output_dir: str | os.PathLike[str],
        use_async: bool = False,
        max_workers: int | None = None,
    ) -> list[SaveResult]:
        """Write every instance in ``objects`` (studies, series, instances, or references) under ``output_dir``.

        With a storage that has a layout (StorageDir, FlatStorageDir, TemplateStorage) the downloader's raw bytes
        are written as they came, checked and atomically (:meth:`DICOMDiskStorage.save_raw`). A custom storage
        that overrides only ``save(dataset, path)`` gets parsed datasets, as in dicomtrolley; so does any storage
        with a downloader that has datasets but no files (WADO-RS metadata), after :func:`make_writable`.

        Parameters
        ----------
        use_async
            As dicomtrolley documents it: split the work and download each part in its own thread. Here a part is
            one series, fetched by one downloader call (so WADO-RS still asks for it in one request); the
            instance list is searched first where ``objects`` lack it, one search per study.
        max_workers
            Threads for ``use_async``; None lets ``ThreadPoolExecutor`` choose. Refused without ``use_async``,
            where it would change nothing.

        Returns
        -------
        list[SaveResult]
            One per instance written or found already present, in download order (series order with
            ``use_async``). A custom ``save`` that returns something else contributes nothing.

        Raises
        ------
        TrolleyError
            The first error, after everything before it was written (with ``use_async``: after every series ran).
        UsageError
            ``max_workers`` without ``use_async``, or ``use_async`` with a downloader that one thread at a time must
            use (C-GET, C-MOVE: one association).
        """
        if max_workers is not None and not use_async:
            raise UsageError("max_workers only applies with use_async=True")
        clean_temp_files(output_dir)
        if use_async:
            results = self._download_threaded(objects, output_dir, max_workers)
        else:
            results = self._download_serial(objects, output_dir)
        present = sum(result.already_present for result in results)
        logger.info("downloaded %d instances to %s (%d already present)", len(results), output_dir, present)
        return results

    def _download_serial(
        self, objects: Downloadable | Iterable[Downloadable], output_dir: str | os.PathLike[str]
    ) -> list[SaveResult]:
        results: list[SaveResult] = []
        if self.storage.supports_raw() and getattr(self.downloader, "raw_files", True):
            for reference, payload in self._dance(self.downloader.iter_raw, objects):
                results.append(self.storage.save_raw(reference, payload, output_dir))
            return results
        for dataset in self._dance(self.downloader.datasets, objects):
            if not getattr(self.downloader, "raw_files", True):
                dataset = make_writable(dataset)
            saved = self.storage.save(dataset, output_dir)
            if isinstance(saved, SaveResult):
                results.append(saved)
        return results

    def _download_threaded(
        self, objects: Downloadable | Iterable[Downloadable], output_dir: str | os.PathLike[str], workers: int | None
    ) -> list[SaveResult]:
        """One :meth:`_download_serial` call per series on a thread pool; the first error raised after all ran."""
        if not getattr(self.downloader, "thread_safe", False):
            raise UsageError(f"use_async needs a downloader that threads may share; {self.downloader!r} is not")
        items = [objects] if isinstance(objects, DICOMObject | DICOMObjectReference) else list(objects)
        references = self._expand(items, DICOMObjectLevels.INSTANCE)
        groups = group_by_series(ref for ref in references if isinstance(ref, InstanceReference))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trolley-download") as pool:
            futures = [pool.submit(self._download_serial, group, output_dir) for group in groups.values()]
        results: list[SaveResult] = []
        errors: list[BaseException] = []
        for future in futures:
            error = future.exception()
            if error is None:
                results.extend(future.result())
            else:
                errors.append(error)
        if errors:
            raise errors[0]
        return results

    def fetch_all_datasets(self, objects: Downloadable | Iterable[Downloadable]) -> Iterator[Dataset]:
        """A pydicom Dataset for every instance in ``objects``, expanding with the searcher where needed."""
        return self._dance(self.downloader.datasets, objects)

    # ------------------------------------------------------------------------------------------------- dance

    def _dance(
        self, fetch: Callable[[list[Downloadable]], Iterator[T]], objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[T]:
        """``fetch(objects)``; on NonSeries/NonInstanceParameterError, expand with the searcher and fetch again.

        The downloader contract says these errors come before the first item, so nothing is fetched twice.
        """
        items: list[Downloadable] = (
            [objects] if isinstance(objects, DICOMObject | DICOMObjectReference) else list(objects)
        )
        expanded_to: set[DICOMObjectLevels] = set()
        while True:
            try:
                iterator = fetch(items)  # may raise here (eager check) or at the first next() (generator)
                first = next(iterator)
            except StopIteration:
                return
            except NonSeriesParameterError as exc:
                level = (
                    DICOMObjectLevels.INSTANCE
                    if isinstance(exc, NonInstanceParameterError)
                    else DICOMObjectLevels.SERIES
                )
                if level in expanded_to:
                    raise  # the downloader refuses even what we expanded to: do not loop
                logger.debug("%s; expanding to %s level with the searcher", exc.message, level.name)
                items = list(self._expand(items, level))
                expanded_to.add(level)
                continue
            yield first
            yield from iterator
            return

    def _expand(self, items: list[Downloadable], level: DICOMObjectLevels) -> list[DICOMObjectReference]:
        """References of ``level`` or lower for ``items``, searching each study at most once for what is missing."""
        query_level = QueryLevels.from_object_level(level)
        searched: dict[str, Study] = {}
        out: list[DICOMObjectReference] = []
        for item in items:
            try:
                out.extend(to_references(item, level))
                continue
            except NoReferencesFoundError:
                pass
            study_uid, series_uid = _study_and_series_uid(item)
            if study_uid not in searched:
                searched[study_uid] = self.searcher.find_study_by_id(study_uid, query_level=query_level)
            study = searched[study_uid]
            found: Study | Series = study
            if series_uid is not None:
                try:
                    found = study.get(series_uid)
                except KeyError as exc:
                    raise NotFoundError(
                        f"the searcher finds no series {series_uid} in study {study_uid}", reference=item
                    ) from exc
            out.extend(to_references(found, level))
        return list(dict.fromkeys(out))  # in order, without duplicates


def _study_and_series_uid(item: Downloadable) -> tuple[str, str | None]:
    """The study (and series, for a series) that a higher-level item needs searched."""
    if isinstance(item, StudyReference):
        return item.study_uid, None
    if isinstance(item, SeriesReference):
        return item.study_uid, item.series_uid
    if isinstance(item, Study):
        return item.uid, None
    if isinstance(item, Series):
        reference = item.reference()
        return reference.study_uid, reference.series_uid
    # Instances always give their own reference; one that cannot (no parents) cannot be searched for either.
    raise NoReferencesFoundError(
        f"cannot locate {item!r} on the server: it has no study/series parents", reference=None
    )
