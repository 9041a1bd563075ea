"""The JSON body of an HTTP response: parsed once, looked up by dotted path, described in
errors without quoting data (:func:`json_kind`), or quoted masked and cut (:func:`shown`)."""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Final

from requests import Response

from flow_assets.errors import SourceError
from resources.redaction import mask_personal_data, redact_text

MISSING: Final = object()
"""Returned by :func:`json_lookup` when the path is not in the document."""

# The source and its paginator both need the parsed body; parse it once per response.
_BODIES: weakref.WeakKeyDictionary[Response, Any] = weakref.WeakKeyDictionary()


# The most characters of a value quoted in an error, and of a text masked to quote it.
SHOWN_CHARS = 200
_MASKED_CHARS = 16 * 1024
# The largest count read from an API (a page count, a total): what a range can hold.
MAX_COUNT = sys.maxsize

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


def excerpt(text: str, limit: int = SHOWN_CHARS) -> str:
    """The start of ``text`` fit for an error: white space collapsed, credentials and
    personal data masked (before the cut: a value cut in two is no longer recognised), at
    most ``limit`` characters.

    Examples:
        >>> excerpt("no  customer alice@example.com,\t ssn 123-45-6789")
        'no customer <email>, ssn <number>'
    """
    text = " ".join(text[:_MASKED_CHARS].split())
    masked = mask_personal_data(redact_text(text))
    return masked if len(masked) <= limit else masked[: limit - 3] + "..."


def shown(value: Any) -> str:
    """A JSON value in an error: a string or a number quoted by :func:`excerpt`, a list or
    an object described by :func:`json_kind` (never quoted: it may be a whole record).

    Examples:
        >>> shown("many"), shown(-1), shown({"email": "alice@example.com"})
        ("'many'", '-1', 'a JSON object (keys: email)')
        >>> shown(10**400)
        'a JSON int of 401 digits'
    """
    if isinstance(value, str):
        return repr(excerpt(value))
    if isinstance(value, int) and value.bit_length() > 64:
        # str() of an int over 4,300 digits raises: count them from the bits.
        digits = len(str(value)) if value.bit_length() < 14_000 else "over 4,000"
        return f"a JSON int of {digits} digits"
    if isinstance(value, (int, float)):
        return excerpt(repr(value))
    return json_kind(value)


def as_count(value: Any) -> int | None:
    """``value`` as a count (a non-negative integer up to ``MAX_COUNT``): a JSON integer,
    an integral float or a string of ASCII digits; None if it is none of them.

    Examples:
        >>> as_count(3), as_count(" 12 "), as_count(2.0), as_count(True), as_count(float("inf"))
        (3, 12, 2, None, None)
    """
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
            return None
        value = int(digits)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_COUNT else None
