"""``RunPolicy``: what decides a run, recorded on the run when it starts.

Any finalizer (the sensor of any code location, ``flowctl``) decides a run with the policy
its own flow had when the run started, never with another flow's or a default one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class RunPolicy:
    """A flow's policy as one run carries it.

    Args:
        max_failed_jobs: failed jobs tolerated: an int count or a float ratio of dispatched.
        deadline_seconds: no heartbeat for this long means the run stalled.
        dedup: ``"run"`` or ``"flow"``.
        keep_failed_keys: with ``dedup="flow"``, keep the keys of failed jobs claimed when
            the run is final (default: release them, so the next run retries them).
        dispatch: ``"inline"`` or ``"rq"``.
        queue: the RQ queue of the run's jobs (``dispatch="rq"``).
        code_location: the code location that launched the run, for humans.
    """

    max_failed_jobs: int | float = 0
    deadline_seconds: float = 3600.0
    dedup: str = "run"
    keep_failed_keys: bool = False
    dispatch: str = "inline"
    queue: str | None = None
    code_location: str | None = None

    @property
    def deadline(self) -> timedelta:
        return timedelta(seconds=self.deadline_seconds)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunPolicy:
        """The policy a row holds; fields a newer release added are ignored."""
        values: dict[str, Any] = json.loads(text)
        known = cls.__dataclass_fields__
        return cls(**{name: value for name, value in values.items() if name in known})
