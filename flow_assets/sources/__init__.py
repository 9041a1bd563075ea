"""Sources of records: HTTP JSON APIs (with paginators) and local files.

Examples:
    >>> from flow_assets.sources import HttpJsonSource, OffsetPaginator
    >>> HttpJsonSource(
    ...     "https://api.example.com/items",
    ...     paginator=OffsetPaginator(limit=100, total_header="X-Total-Count"),
    ... )  # doctest: +ELLIPSIS
    HttpJsonSource(GET https://api.example.com/items, OffsetPaginator(limit=100, ...))
"""

from __future__ import annotations

from flow_assets.sources.auth import BasicAuth, BearerAuth, HeaderAuth
from flow_assets.sources.base import Page, PageRef, Source, SourceDownError
from flow_assets.sources.files import FileSource
from flow_assets.sources.http import HttpJsonSource
from flow_assets.sources.paginators import (
    BasePaginator,
    HeaderLinkPaginator,
    JSONCursorPaginator,
    JSONLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
)
from flow_assets.sources.sql import SqlSource

__all__ = [
    "BasePaginator",
    "BasicAuth",
    "BearerAuth",
    "FileSource",
    "HeaderAuth",
    "HeaderLinkPaginator",
    "HttpJsonSource",
    "JSONCursorPaginator",
    "JSONLinkPaginator",
    "OffsetPaginator",
    "Page",
    "PageNumberPaginator",
    "PageRef",
    "Source",
    "SourceDownError",
    "SqlSource",
]
