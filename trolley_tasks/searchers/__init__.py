"""Searchers: how a query becomes the object tree (studies, their series, their instances)."""

from trolley_tasks.searchers.base import Searcher, SearcherBase
from trolley_tasks.searchers.mint import Mint, MintQuery
from trolley_tasks.searchers.qido_rs import HierarchicalQuery, IncompleteResultError, QidoRS, RelationalQuery
from trolley_tasks.searchers.tree import TreeBuilder, build_tree
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

__all__ = [
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
