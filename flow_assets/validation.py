"""Split a page's raw records into keyed records and rejects (kept, with their reason).

A key must be storable everywhere it goes: Redis (UTF-8, so no lone surrogate, which JSON's
``"\\ud800"`` gives) and PostgreSQL (no NUL). A record with such a key is rejected like
any invalid one; the raw record kept in quarantine has those characters escaped, so it can
be stored and still reads back (``json.loads``) as the record the source sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flow_assets.dispatch import error_text
from resources.ledger.records import RejectedRecord
from resources.redaction import escape_unstorable, redact_text

MAX_KEY_CHARS = 512
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ValidatedPage:
    keys: list[str] = field(default_factory=list)
    records: list[Mapping[str, Any]] = field(default_factory=list)
    rejects: list[RejectedRecord] = field(default_factory=list)


def validate_records(
    records: Sequence[Any],
    key: str | Callable[[Mapping[str, Any]], Hashable],
    max_record_bytes: int | None = None,
) -> ValidatedPage:
    """Key every record, rejecting non-objects, missing or ill-typed keys, oversized records."""
    if isinstance(key, str) and max_record_bytes is None:
        return _validate_by_field(records, key)
    page = ValidatedPage()
    for position, record in enumerate(records):
        _validate_one(page, position, record, key, max_record_bytes)
    return page


def _validate_by_field(records: Sequence[Any], field_name: str) -> ValidatedPage:
    """The common case without per-record calls: plain dicts whose key field holds a str or
    an int. Any other record takes the general path, which keys or rejects it the same way."""
    page = ValidatedPage()
    keys, kept = page.keys, page.records
    for position, record in enumerate(records):
        if type(record) is dict:
            value = record.get(field_name)
            if type(value) is str and 0 < len(value) <= MAX_KEY_CHARS and _storable(value):
                keys.append(value)
                kept.append(record)
                continue
            if type(value) is int and len(text := str(value)) <= MAX_KEY_CHARS:
                keys.append(text)
                kept.append(record)
                continue
        _validate_one(page, position, record, field_name, None)
    return page


def _validate_one(
    page: ValidatedPage,
    position: int,
    record: Any,
    key: str | Callable[[Mapping[str, Any]], Hashable],
    max_record_bytes: int | None,
) -> None:
    record_key, reason = _key_of(record, key)
    if reason is None and max_record_bytes is not None:
        size = len(_raw(record).encode())
        if size > max_record_bytes:
            reason = f"record is {size} bytes, over max_record_bytes={max_record_bytes}"
    if reason is None:
        page.keys.append(record_key)
        page.records.append(record)
    else:
        page.rejects.append(RejectedRecord(position, redact_text(reason), _raw(record)))


def _key_of(record: Any, key: str | Callable[[Mapping[str, Any]], Hashable]) -> tuple[str, Any]:
    if not isinstance(record, Mapping):
        return "", f"record is a {type(record).__name__}, not an object"
    if isinstance(key, str):
        if key not in record:
            return "", f"record has no key field {key!r}"
        value = record[key]
    else:
        try:
            value = key(record)
        except Exception as exc:  # the user's key function: any failure rejects the record
            # Its message may quote the record: masked (the raw record is kept beside it).
            return "", f"key function raised {error_text(exc, 'masked')}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        return "", f"record key has type {type(value).__name__}; expected str or int"
    text = str(value)
    if not text or len(text) > MAX_KEY_CHARS:
        return "", f"record key must have 1 to {MAX_KEY_CHARS} characters"
    if not _storable(text):
        return "", _unstorable_key(text)
    return text, None


def _storable(key: str) -> bool:
    """No NUL (PostgreSQL) and no lone surrogate (UTF-8): the common ASCII key is checked
    without a regex."""
    return "\x00" not in key and (key.isascii() or _SURROGATE.search(key) is None)


def _unstorable_key(key: str) -> str:
    index, char = next((i, c) for i, c in enumerate(key) if c == "\x00" or _SURROGATE.match(c))
    what = "a NUL character" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return (
        f"record key holds {what} at character {index}, which the ledger and Redis cannot"
        " store; fix the source's data, or give Flow a key function that returns a clean key"
    )


def _raw(record: Any) -> str:
    """The record as JSON, lone surrogates escaped (JSON already escapes NUL): storable,
    and ``json.loads`` gives the record back."""
    return escape_unstorable(json.dumps(record, default=str, ensure_ascii=False))
