"""WADO-RS metadata as a *downloader* (dicomtrolley's ``WadoRSMetaData``): every attribute of each instance except
bulk data such as PixelData, as pydicom Datasets, without downloading the images.

``GET {url}/studies/{s}[/series/{se}[/instances/{i}]]/metadata`` (PS3.18 10.4.1.1.2; all three levels are in the
standard) answers DICOM JSON; bulk data URIs are never followed. The searcher of the same protocol,
:class:`~trolley_tasks.searchers.wado_rs_metadata.WadoRSMetadata`, builds the object tree from the same answer.

There are no Part 10 bytes to keep, so :meth:`WadoRSMetaData.iter_raw` refuses, and
:class:`~trolley_tasks.trolley.Trolley` writes these datasets through ``storage.save`` after
:func:`~trolley_tasks.storage.make_writable`: header-only files, which a later export with pixel data replaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

from pydicom import Dataset

from trolley_tasks.core import (
    DICOMObject,
    DICOMObjectReference,
    Downloadable,
    InstanceReference,
    SeriesReference,
)
from trolley_tasks.downloaders.base import DownloaderBase
from trolley_tasks.errors import NotFoundError, PayloadInvalidError, UsageError
from trolley_tasks.formats.part10 import RawPayload
from trolley_tasks.transports.http import HTTPEndpoint, get_dicom_json, redact_url


class WadoRSMetaData(HTTPEndpoint, DownloaderBase):
    """Download the metadata of studies, series or instances, one request per object given.

    Parameters
    ----------
    session, url, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`); ``url`` is the WADO-RS
        root, for example ``http://server:8042/dicom-web``.
    """

    raw_files: ClassVar[bool] = False

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Refused: metadata is not a Part 10 file. Use :meth:`datasets`."""
        raise UsageError("WadoRSMetaData downloads datasets without pixel data, not files; use datasets()")

    def datasets(self, objects: Downloadable | Iterable[Downloadable]) -> Iterator[Dataset]:
        """The metadata of every instance in ``objects``, object by object in the order given.

        Every dataset is checked to belong to the object asked for (the identity check all our downloaders make).

        Raises
        ------
        NotFoundError
            The server has no such study, series or instance (404 or 204).
        PayloadInvalidError
            The answer holds an instance of another study, series or SOP instance than the one asked for.
        """
        items = [objects] if isinstance(objects, DICOMObject | DICOMObjectReference) else list(objects)
        for item in items:
            yield from self._metadata(item if isinstance(item, DICOMObjectReference) else item.reference())

    def _metadata(self, reference: DICOMObjectReference) -> Iterator[Dataset]:
        path = f"/studies/{reference.study_uid}"  # type: ignore[attr-defined]
        if isinstance(reference, SeriesReference | InstanceReference):
            path += f"/series/{reference.series_uid}"
        if isinstance(reference, InstanceReference):
            path += f"/instances/{reference.instance_uid}"
        url = f"{self.url}{path}/metadata"
        datasets = get_dicom_json(self, url, reference)
        if not datasets:
            raise NotFoundError(f"no metadata for {reference} at {redact_url(url)}", source=self.source)
        for ds in datasets:
            _check_belongs(ds, reference, self.source)
            yield ds


def _check_belongs(ds: Dataset, reference: DICOMObjectReference, source: str | None) -> None:
    expected = {"StudyInstanceUID": reference.study_uid}  # type: ignore[attr-defined]
    if isinstance(reference, SeriesReference | InstanceReference):
        expected["SeriesInstanceUID"] = reference.series_uid
    if isinstance(reference, InstanceReference):
        expected["SOPInstanceUID"] = reference.instance_uid
    for keyword, uid in expected.items():
        if str(ds.get(keyword, "")) != uid:
            raise PayloadInvalidError(
                f"metadata asked for {reference} holds {keyword} {str(ds.get(keyword, ''))[:80]!r}",
                source=source,
                reference=reference,
            )
