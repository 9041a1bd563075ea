"""Errors raised while declaring or reading a flow.

Each redacts its own message (``redact_text``) when it is made, so no credential reaches
Dagster's events, logs or the ledger through one, whatever the message quotes.
"""

from __future__ import annotations

from resources.errors import ConfigurationError, FlowError, RedactedError

__all__ = ["ConfigurationError", "FlowDefinitionError", "FlowError", "HandlerError", "SourceError"]


class FlowDefinitionError(RedactedError, ValueError):
    """A flow definition is invalid; raised when the flow is declared, naming the option."""


class SourceError(RedactedError):
    """A source could not produce a page: the message names the source, the page and the
    problem (never a credential)."""


class HandlerError(RedactedError):
    """A flow's handler raised: the message names the flow and page and carries the
    handler's error as ``Type: message``, secrets redacted and, unless the flow sets
    ``error_detail="full"``, personal data masked (the original is not chained, so
    Dagster's events never hold its text)."""
