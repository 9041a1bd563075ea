"""Errors users see: each says what happened, to what, and what to do. None carries a secret."""

from __future__ import annotations

from resources.redaction import redact_text


class FlowError(Exception):
    """Base class of this package's errors."""


class RedactedError(FlowError):
    """A FlowError whose message passes through ``redact_text`` when it is made, so no
    credential reaches Dagster's events, logs or the ledger through it, whatever it quotes."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact_text(str(message)), *args)


class ConfigurationError(RedactedError, ValueError):
    """A setting is missing or invalid; the message names the setting and the fix."""


class StoreUnavailableError(FlowError):
    """The metrics database could not be reached after retries (URL redacted)."""


class CountersUnavailableError(FlowError):
    """The Redis server could not be reached after retries (URL redacted)."""


class RunFinalError(FlowError):
    """A step wrote to a flow run that is already final (its Dagster run was failed or
    cancelled while the step still worked): nothing is recorded after the final write."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(
            f"flow run {run_id} is already final ({status}): this step's pages are not"
            " recorded; re-execute the run to continue it"
        )


class StoreError(FlowError):
    """A statement on the metrics database failed: ``Type: driver message``, secrets redacted
    and personal data masked. Chained to nothing: SQLAlchemy's text of the error quotes the
    statement's parameters (record keys), and Dagster shows a step error's whole chain."""


class StoreIntegrityError(StoreError):
    """A statement broke a constraint (e.g. the pages of a run that has no row)."""
