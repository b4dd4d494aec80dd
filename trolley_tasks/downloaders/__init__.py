"""Downloaders: how references become DICOM bytes and datasets."""

from trolley_tasks.downloaders.base import Downloader, DownloaderBase, RawPayload
from trolley_tasks.downloaders.rad69 import Rad69, XDSMissingDocumentError
from trolley_tasks.downloaders.wado_rs import WadoRS
from trolley_tasks.downloaders.wado_uri import WadoURI

__all__ = ["Downloader", "DownloaderBase", "RawPayload", "Rad69", "WadoRS", "WadoURI", "XDSMissingDocumentError"]
