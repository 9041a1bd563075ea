"""Values of SQL rows as records, and partition keys as SQL values.

Rows become JSON-friendly: date/time -> ISO 8601 string, Decimal -> str (exact: a float
would round money), timedelta -> seconds (float), bytes -> base64 string, UUID and any other
non-JSON type -> str.
"""

from __future__ import annotations

import base64
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import NullType


def jsonable(value: Any) -> Any:
    """``value`` as JSON types (see the module docstring for the conversions)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime, date, dt_time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


_PARTITION_TYPES: dict[type, Any] = {
    datetime: datetime.fromisoformat,
    date: date.fromisoformat,
    int: int,
    float: float,
    Decimal: Decimal,
}


def partition_condition(column: sa.ColumnElement[Any], partition_key: str) -> Any:
    """``column == partition_key``, the key converted to the column's type; ValueError (or
    decimal.InvalidOperation) if the key is not a value of that type."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        python_type = object
    if python_type is str:
        return column == partition_key
    convert = _PARTITION_TYPES.get(python_type)
    if convert is None:
        # Untyped (a SQL string query) or exotic: an untyped parameter lets the
        # database cast the key to the column's type (PostgreSQL: date = varchar fails).
        return column == sa.bindparam("partition_key", partition_key, type_=NullType())
    return column == convert(partition_key)
