"""Steps say they are alive while they work, so a long handler is not taken for a stall.

The finalizer declares a run stalled when its ledger row shows no progress for the flow's
``deadline``; page writes move that clock, and so does this heartbeat between them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from resources.ledger.ledger import Ledger

log = logging.getLogger(__name__)
MAX_INTERVAL_SECONDS = 30.0


def heartbeat_interval(deadline: timedelta) -> float:
    """Often enough that a few missed beats still land well inside the deadline."""
    return max(0.05, min(MAX_INTERVAL_SECONDS, deadline.total_seconds() / 4))


@contextmanager
def heartbeat(store: Ledger, run_id: str, interval_seconds: float) -> Iterator[None]:
    """Beat every ``interval_seconds`` in a daemon thread while the block runs.

    A failed beat (the ledger briefly unreachable) is logged and retried at the next one:
    the step's own work decides whether it fails, not its heartbeat.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_seconds):
            try:
                store.heartbeat(run_id)
            except Exception as exc:  # keep beating; the step decides whether it fails
                log.warning("run %s: heartbeat not recorded: %s", run_id, type(exc).__name__)

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
