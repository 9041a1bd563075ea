"""What a flow's step lets out when it fails: Dagster writes the error, its ``__cause__`` and
its ``__context__`` (messages and tracebacks) to the event log, the UI and ``failure_reason``.

A driver's exception quotes what it was given: SQLAlchemy the statement's parameters (record
keys), requests the URL with its query secrets, a handler the record it choked on. So each
error leaves a step as one message, secrets redacted and (unless the flow sets
``error_detail="full"``) personal data masked, with no chain behind it. The step's log keeps
the traceback's frames (code, not data) for whoever debugs it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from flow_assets.dispatch import error_text
from flow_assets.flow import Flow
from resources.errors import FlowError, RedactedError

log = logging.getLogger(__name__)


class StepError(RedactedError):
    """An error that is not this package's own, as it leaves a step: ``Type: message``."""


@contextmanager
def outward_errors(flow: Flow, step: str) -> Iterator[None]:
    """Let errors out of the block as described in the module docstring.

    Dagster's own signals (``Failure``, ``RetryRequested``, interrupts) pass unchanged.
    """
    try:
        yield
    except (dg.Failure, dg.RetryRequested):
        raise
    except FlowError as exc:  # ours: its message is redacted already; drop what it wraps
        raise _unchained(exc) from None
    except Exception as exc:
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("flow %s %s: %s raised at:\n%s", flow.name, step, type(exc).__name__, frames)
        raise StepError(error_text(exc, flow.error_detail)) from None


def _unchained(exc: FlowError) -> FlowError:
    exc.__cause__ = None
    exc.__context__ = None
    exc.__suppress_context__ = True
    return exc
