"""Errors users see: each says what happened, to what, and what to do. None carries a secret."""

from __future__ import annotations


class FlowError(Exception):
    """Base class of this package's errors."""


class ConfigurationError(FlowError, ValueError):
    """A setting is missing or invalid; the message names the setting and the fix."""


class StoreUnavailableError(FlowError):
    """The metrics database could not be reached after retries (URL redacted)."""


class CountersUnavailableError(FlowError):
    """The Redis server could not be reached after retries (URL redacted)."""
