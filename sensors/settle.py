"""Cancel the queued RQ jobs of runs the finalizer just made final.

``cancel_queued_jobs`` is called right after ``Ledger.finalize_many`` with the rows
of the runs that call moved out of ``running``. A ``dispatch="rq"`` run's jobs still
waiting in its queue (its own policy names it) are cancelled
(``rq_dispatch.cancel_run_jobs``), so a worker started later does not run them. (The keys
of failed jobs are released inside the final write's own transaction,
``run_queries.finalize_many``.)

Idempotent, and not what correctness rests on if it never runs (the finalizer crashed
right after committing): a worker skips any job of a final run and records an outcome
acknowledged after finalization as late. A failure is logged, never raised: the runs are
final already, and publishing them must go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flow_assets.rq.dispatch import cancel_run_jobs
from resources.ledger.records import RunRow
from resources.live.counters import LiveCounters
from resources.redaction import redact_text

log = logging.getLogger(__name__)


def cancel_queued_jobs(counters: LiveCounters, rows: Sequence[RunRow]) -> dict[str, int]:
    """Cancel the queued RQ jobs of the final runs ``rows``; run id -> jobs cancelled."""
    cancelled: dict[str, int] = {}
    for row in rows:
        policy = row.policy
        if policy is None or policy.dispatch != "rq":
            continue
        queue = policy.queue or row.flow_name
        try:
            count = cancel_run_jobs(
                counters.rq_connection(), queue, row.flow_name, row.run_id, counters.key_ttl_seconds
            )
        except Exception as exc:  # logged: workers skip the jobs of final runs all the same
            log.warning(
                "could not cancel the queued jobs of run %s: %s: %s (workers skip the jobs of"
                " final runs all the same)",
                row.run_id,
                type(exc).__name__,
                redact_text(str(exc)),
            )
            continue
        if count:
            cancelled[row.run_id] = count
            log.info(
                "flow %s run %s is final: %d queued RQ jobs cancelled on queue %s",
                row.flow_name,
                row.run_id,
                count,
                queue,
            )
    return cancelled
