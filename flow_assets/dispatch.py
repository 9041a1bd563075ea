"""The handler's view of one page's jobs: report outcomes as idempotent state transitions."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from resources.redaction import mask_personal_data, redact_text

log = logging.getLogger(__name__)
PENDING, COMPLETED, FAILED = "pending", "completed", "failed"
MAX_ERROR_CHARS = 2000
# How much of a handler's error is shown outside the failed jobs' rows (Flow.error_detail).
ERROR_DETAILS = ("masked", "full")


class JobBatch:
    """The deduplicated records of one page, one job each, handed to a flow's handler.

    A job's outcome is a state transition: pending -> completed or failed, and failed ->
    completed (a successful retry). Repeating a transition (a double ack) changes nothing,
    and a completed job stays completed. Jobs still pending when the handler returns
    normally are completed.

    Args:
        keys: the record keys, one per record.
        records: the records, in page order.

    Examples:
        >>> batch = JobBatch(["a", "b"], [{"id": "a"}, {"id": "b"}])
        >>> batch.fail(batch.records[1], ValueError("bad"))
        >>> batch.fail("b", ValueError("bad again"))  # repeated: no change
        >>> batch.finish()
        (1, 1)
    """

    def __init__(self, keys: Sequence[str], records: Sequence[Mapping[str, Any]]) -> None:
        if len(keys) != len(records):
            raise ValueError(f"JobBatch: {len(keys)} keys for {len(records)} records")
        self.keys = list(keys)
        self.records = list(records)
        self._key_by_id: dict[int, str] | None = None  # built on the first record reported
        self._state = dict.fromkeys(self.keys, PENDING)
        self._errors: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.records)

    def items(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """``(key, record)`` pairs."""
        return zip(self.keys, self.records, strict=True)

    def complete(self, job: str | Mapping[str, Any]) -> None:
        """Mark a job completed (a record of this batch, or its key)."""
        key = self._key(job)
        self._state[key] = COMPLETED
        self._errors.pop(key, None)

    def fail(self, job: str | Mapping[str, Any], error: BaseException | str) -> None:
        """Mark a job failed with its error, unless it already completed."""
        key = self._key(job)
        if self._state[key] == PENDING:
            self._state[key] = FAILED
            self._errors[key] = error_text(error)

    def fail_pending(self, error: BaseException | str) -> int:
        """Fail every job still pending with ``error`` (the handler gave up); how many."""
        pending = [key for key, state in self._state.items() if state == PENDING]
        for key in pending:
            self.fail(key, error)
        return len(pending)

    def finish(self) -> tuple[int, int]:
        """Complete what is still pending; return ``(completed, failed)``."""
        for key, state in self._state.items():
            if state == PENDING:
                self._state[key] = COMPLETED
        failed = len(self._errors)
        return len(self._state) - failed, failed

    @property
    def failures(self) -> dict[str, str]:
        """Error text of each failed job, by record key."""
        return dict(self._errors)

    def _key(self, job: str | Mapping[str, Any]) -> str:
        if isinstance(job, str):
            key: str | None = job
        else:
            if self._key_by_id is None:
                self._key_by_id = {id(r): k for k, r in zip(self.keys, self.records, strict=True)}
            key = self._key_by_id.get(id(job))
        if key is None or key not in self._state:
            raise KeyError(
                "JobBatch: that record is not part of this batch; report the record object the"
                " batch handed you, or its key"
            )
        return key


def error_text(error: BaseException | str, detail: str = "full") -> str:
    """An error as text: ``Type: message``, secrets redacted, length capped.

    ``detail="full"`` is what a failed job's row keeps; ``"masked"`` also masks personal
    data (emails, phone and other long numbers, tokens), for every other place.

    Examples:
        >>> error_text(ValueError("no customer bob@example.com"), "masked")
        'ValueError: no customer <email>'
    """
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = redact_text(text)
    if detail != "full":
        text = mask_personal_data(text)
    return text[:MAX_ERROR_CHARS]


def traceback_text(exc: BaseException, detail: str) -> str:
    """An error's traceback for a log: whole (secrets redacted) with ``detail="full"``; else
    its frames only, which show code, not data (log the masked message beside it)."""
    if detail == "full":
        return redact_text("".join(traceback.format_exception(exc)))
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return redact_text(f"Traceback (most recent call last):\n{frames}")


def handler_error_text(flow_name: str, page_index: int, exc: Exception, detail: str) -> str:
    """What a handler's exception shows outside the failed jobs' rows, logged with its
    traceback as ``detail`` allows: ``flow 'x' page N: the handler raised Type: message``."""
    shown = error_text(exc, detail)
    log.error(
        "flow %s page %d: the handler raised %s\n%s",
        flow_name,
        page_index,
        shown,
        traceback_text(exc, detail),
    )
    return f"flow {flow_name!r} page {page_index}: the handler raised {shown}"
