"""Paginators: how to ask an HTTP API for the next page, and when to stop.

The protocol is dlt's REST-client one (``init_request``, ``update_state``, ``update_request``,
``has_next_page``), written here so the package does not depend on dlt. A paginator holds the
state of one walk through the pages; the source copies it for every walk.

Stop conditions are explicit: an empty page (``stop_after_empty_page``), the total reached, no
next cursor or link, or ``max_pages`` pages read. A cursor or a next link met before is an
error, not a loop. Paginators that learn the total from the first response (page numbers
or offsets with a total) are *random access*: ``page_params`` returns the parameters of
every page (a lazy sequence: a total of a billion costs nothing until read), so pages can
be fetched in parallel and out of order.
"""

from flow_assets.sources.paginators.base import BasePaginator
from flow_assets.sources.paginators.links import (
    HeaderLinkPaginator,
    JSONCursorPaginator,
    JSONLinkPaginator,
)
from flow_assets.sources.paginators.ranges import OffsetPaginator, PageNumberPaginator

__all__ = [
    "BasePaginator",
    "HeaderLinkPaginator",
    "JSONCursorPaginator",
    "JSONLinkPaginator",
    "OffsetPaginator",
    "PageNumberPaginator",
]
