"""Checks of the options users pass to flows, sources and dispatch: each names the option and
what it expects, raising FlowDefinitionError when the flow is declared, not mid-run."""

from __future__ import annotations

from typing import Any

from flow_assets.errors import FlowDefinitionError


def is_int_at_least(value: object, minimum: int) -> bool:
    """Whether ``value`` is an int >= ``minimum``; a bool is not (True as a page size is a
    mistake, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_seconds(value: object) -> bool:
    """Whether ``value`` is a number of seconds > 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def require_int(value: Any, option: str, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else FlowDefinitionError naming ``option``."""
    if not is_int_at_least(value, minimum):
        raise FlowDefinitionError(f"{option} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def require_name(value: Any, option: str) -> str:
    """``value`` if it is a non-empty string, else FlowDefinitionError naming ``option``."""
    if not isinstance(value, str) or not value.strip():
        raise FlowDefinitionError(f"{option} must be a non-empty string, got {value!r}.")
    return value


def require_path(value: Any, option: str) -> str:
    """``value`` if it is a dotted JSON path, else FlowDefinitionError naming ``option``."""
    if not isinstance(value, str) or not value or any(not p for p in value.split(".")):
        raise FlowDefinitionError(
            f"{option} must be a dotted JSON path such as 'meta.total', got {value!r}."
        )
    return value
