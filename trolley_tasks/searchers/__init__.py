"""Searchers: how a query becomes the object tree (studies, their series, their instances).

One module per protocol, each exporting its searcher class (and its query type where it has one):

==================  ======================================  ==================================
protocol            module                                  classes
==================  ======================================  ==================================
QIDO-RS             :mod:`~.qido_rs`                        ``QidoRS``, ``HierarchicalQuery``,
                                                            ``RelationalQuery``
WADO-RS metadata    :mod:`~.wado_rs_metadata`               ``WadoRSMetadata``
MINT                :mod:`~.mint`                           ``Mint``, ``MintQuery``
DICOM-QR (C-FIND)   :mod:`~.dicom_qr`                       ``DICOMQR``, ``DICOMQuery``
==================  ======================================  ==================================

plus :class:`CachedSearcher` (:mod:`~.caching`), which wraps any of them. The DICOM-QR names are imported on first
use (PEP 562), so that a process that searches over HTTP never loads pynetdicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trolley_tasks.searchers.base import Searcher, SearcherBase
from trolley_tasks.searchers.caching import CachedSearcher, DICOMObjectCache
from trolley_tasks.searchers.mint import Mint, MintQuery
from trolley_tasks.searchers.qido_rs import HierarchicalQuery, IncompleteResultError, QidoRS, RelationalQuery
from trolley_tasks.searchers.tree import TreeBuilder, build_tree
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

if TYPE_CHECKING:
    from trolley_tasks.searchers.dicom_qr import DICOMQR, DICOMQuery

_LAZY = {"DICOMQR": "trolley_tasks.searchers.dicom_qr", "DICOMQuery": "trolley_tasks.searchers.dicom_qr"}

__all__ = [
    "DICOMQR",
    "CachedSearcher",
    "DICOMObjectCache",
    "DICOMQuery",
    "HierarchicalQuery",
    "IncompleteResultError",
    "Mint",
    "MintQuery",
    "QidoRS",
    "RelationalQuery",
    "Searcher",
    "SearcherBase",
    "TreeBuilder",
    "WadoRSMetadata",
    "build_tree",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
