"""Names that become Redis keys, SQL values and Dagster names must be boring."""

from __future__ import annotations

import re

from resources.errors import FlowError


class InvalidNameError(FlowError, ValueError):
    """A flow, partition or other name is outside the safe alphabet."""


# Lower-case letters, digits and underscores: valid as a Dagster name, and free of the
# characters that mean something in Redis keys and patterns (* ? [ ] { } :).
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def validate_name(value: object, what: str) -> str:
    """Return ``value`` if it is a safe name, else raise naming ``what`` and the fix."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidNameError(
            f"{what} {value!r} is not a valid name: use 1-63 characters of lower-case letters,"
            " digits and '_', starting with a letter (for example 'orders_api')."
        )
    return value
