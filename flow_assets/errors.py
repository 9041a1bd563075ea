"""Errors raised while declaring or reading a flow."""

from __future__ import annotations

from resources.errors import ConfigurationError, FlowError

__all__ = ["ConfigurationError", "FlowDefinitionError", "FlowError", "HandlerError", "SourceError"]


class FlowDefinitionError(FlowError, ValueError):
    """A flow definition is invalid; raised when the flow is declared, naming the option."""


class SourceError(FlowError):
    """A source could not produce a page: the message names the source, the page and the
    problem (never a credential)."""


class HandlerError(FlowError):
    """A flow's handler raised: the message names the flow and page and carries the
    handler's error as ``Type: message``, secrets redacted (the original is not chained,
    so Dagster's events never hold its unredacted text)."""
