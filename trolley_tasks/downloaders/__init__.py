"""Downloaders: how references become DICOM bytes and datasets."""

from trolley_tasks.downloaders.base import Downloader, DownloaderBase, RawPayload

__all__ = ["Downloader", "DownloaderBase", "RawPayload"]
