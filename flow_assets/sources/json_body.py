"""The JSON body of an HTTP response: parsed once, looked up by dotted path, described in
errors without quoting data."""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Final

from requests import Response

from flow_assets.errors import SourceError

MISSING: Final = object()
"""Returned by :func:`json_lookup` when the path is not in the document."""

# The source and its paginator both need the parsed body; parse it once per response.
_BODIES: weakref.WeakKeyDictionary[Response, Any] = weakref.WeakKeyDictionary()


# A key shown in an error: a field name. Other keys may be data (an e-mail address as key).
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,30}")


def response_json(response: Response) -> Any:
    """The parsed JSON body of ``response``, parsed once; ValueError if it is not JSON,
    SourceError if it nests deeper than the parser can follow."""
    try:
        return _BODIES[response]
    except KeyError:
        pass
    try:
        body = _BODIES[response] = response.json()
    except RecursionError:
        # The C parser recurses once per level: "[[[[..." fails at the recursion limit.
        raise SourceError(
            f"the JSON body nests deeper than the parser follows (about "
            f"{sys.getrecursionlimit()} levels)"
        ) from None
    return body


def json_kind(value: Any) -> str:
    """What a JSON value is, for errors. An object names only its keys that look like
    field names (at most 10) and counts the others: a key may be data, e.g. an e-mail.

    Examples:
        >>> json_kind({"data": [], "meta": {}, "bob@example.com": 1})
        'a JSON object (keys: data, meta; 1 more not shown)'
        >>> json_kind([1, 2])
        'a JSON list'
    """
    if isinstance(value, Mapping):
        keys = list(map(str, value))
        shown = sorted(k for k in keys if _FIELD_NAME.fullmatch(k))[:10]
        hidden = len(keys) - len(shown)
        if not keys:
            return "an empty JSON object"
        if not shown:
            return f"a JSON object ({len(keys)} keys, none shown)"
        more = f"; {hidden} more not shown" if hidden else ""
        return f"a JSON object (keys: {', '.join(shown)}{more})"
    return {list: "a JSON list", str: "a JSON string", type(None): "null"}.get(
        type(value), f"a JSON {type(value).__name__}"
    )


def json_lookup(document: Any, path: str) -> Any:
    """The value at dotted ``path`` ("data.items", "pages.0.next") or ``MISSING``.

    Examples:
        >>> json_lookup({"meta": {"total": 3}}, "meta.total")
        3
        >>> json_lookup({"meta": {}}, "meta.total") is MISSING
        True
    """
    value = document
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value
