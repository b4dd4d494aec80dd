"""Downloaders: how references become DICOM bytes and datasets.

One module per protocol, each exporting its downloader class; all share :class:`DownloaderBase` and satisfy
:class:`Downloader` (``iter_raw``, ``datasets``, ``get_dataset``, ``close``, ``whole_series``):

==================  ======================================  ==================================
protocol            module                                  classes
==================  ======================================  ==================================
WADO-RS             :mod:`~.wado_rs`                        ``WadoRS``
WADO-URI            :mod:`~.wado_uri`                       ``WadoURI``
IHE RAD-69          :mod:`~.rad69`                          ``Rad69``, ``XDSMissingDocumentError``
C-GET, C-MOVE       :mod:`~.dicom_qr`                       ``CGet``, ``CMove``
==================  ======================================  ==================================

The DIMSE names are imported on first use (PEP 562), so that a process that downloads over HTTP never loads
pynetdicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trolley_tasks.downloaders.base import AS_STORED, Downloader, DownloaderBase, RawPayload
from trolley_tasks.downloaders.rad69 import Rad69, XDSMissingDocumentError
from trolley_tasks.downloaders.wado_rs import WadoRS
from trolley_tasks.downloaders.wado_uri import WadoURI

if TYPE_CHECKING:
    from trolley_tasks.downloaders.dicom_qr import CGet, CMove

_LAZY = {"CGet": "trolley_tasks.downloaders.dicom_qr", "CMove": "trolley_tasks.downloaders.dicom_qr"}

__all__ = [
    "AS_STORED",
    "CGet",
    "CMove",
    "Downloader",
    "DownloaderBase",
    "Rad69",
    "RawPayload",
    "WadoRS",
    "WadoURI",
    "XDSMissingDocumentError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
