"""Errors raised while declaring or reading a flow."""

from __future__ import annotations

from resources.errors import ConfigurationError, FlowError

__all__ = ["ConfigurationError", "FlowDefinitionError", "FlowError", "SourceError"]


class FlowDefinitionError(FlowError, ValueError):
    """A flow definition is invalid; raised when the flow is declared, naming the option."""


class SourceError(FlowError):
    """A source could not produce a page: the message names the source, the page and the
    problem (never a credential)."""
