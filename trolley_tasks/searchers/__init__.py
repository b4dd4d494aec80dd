"""Searchers: how a query becomes the object tree (studies, their series, their instances)."""

from trolley_tasks.searchers.base import Searcher, SearcherBase

__all__ = ["Searcher", "SearcherBase"]
