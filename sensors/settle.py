"""Settle runs the finalizer just made final: release failed keys, cancel queued RQ jobs.

``settle_final_runs`` is called right after ``MetricsStore.finalize_many`` with the rows of
the runs that pass decided; the ones final in the ledger are settled (a run a concurrent
finalizer made final is settled twice, harmlessly). Each run is settled by its own policy
(``RunRow.policy``):

* ``dedup="flow"`` without ``keep_failed_keys``: the keys of its failed and lost jobs are
  released, so the next run of the flow dispatches those records again
  (``flow_key_queries.release_failed_keys``);
* ``dispatch="rq"``: its jobs still waiting in its queue are cancelled
  (``rq_dispatch.cancel_run_jobs``), so a worker started later does not run them.

Both are idempotent and safe to repeat, and neither is what correctness rests on if this
step never runs (the finalizer crashed right after committing): the release is meant to
run inside the finalize transaction as well (``store_queries.finalize_many``), and a
worker skips any job of a final run and records an outcome acknowledged after
finalization as late. A failure here is logged and reported, never raised: the runs are
final already, and publishing them must go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from flow_assets.rq_dispatch import cancel_run_jobs
from resources.metrics_store import MetricsStore, RunRow
from resources.redaction import redact_text
from resources.redis_counters import RedisCounters

log = logging.getLogger(__name__)


@dataclass
class SettleReport:
    """What ``settle_final_runs`` did."""

    released_keys: int = 0
    cancelled_jobs: dict[str, int] = field(default_factory=dict)  # run_id -> jobs
    errors: list[str] = field(default_factory=list)


def settle_final_runs(
    store: MetricsStore, counters: RedisCounters, rows: Sequence[RunRow]
) -> SettleReport:
    """Release the failed keys and cancel the queued RQ jobs of final runs ``rows``.

    Runs that are not final in the ledger (any more) are left alone. Runs that recorded no
    policy (older rows) have nothing to settle.
    """
    report = SettleReport()
    if not rows:
        return report
    try:
        statuses = store.statuses([row.run_id for row in rows])
    except Exception as exc:  # logged and reported: the runs are final
        report.errors.append(_failed("read the runs' statuses", exc))
        return report
    final = [row for row in rows if statuses.get(row.run_id, "running") != "running"]
    to_release = [
        row.run_id
        for row in final
        if row.policy is not None and row.policy.dedup == "flow" and not row.policy.keep_failed_keys
    ]
    if to_release:
        try:
            report.released_keys = store.release_failed_keys(to_release)
        except Exception as exc:
            report.errors.append(_failed(f"release the failed keys of {len(to_release)} runs", exc))
    for row in final:
        policy = row.policy
        if policy is None or policy.dispatch != "rq":
            continue
        queue = policy.queue or row.flow_name
        try:
            cancelled = cancel_run_jobs(
                counters.rq_connection(),
                queue,
                row.flow_name,
                row.run_id,
                counters.key_ttl_seconds,
            )
        except Exception as exc:
            report.errors.append(_failed(f"cancel the queued jobs of run {row.run_id}", exc))
            continue
        if cancelled:
            report.cancelled_jobs[row.run_id] = cancelled
            log.info(
                "flow %s run %s is %s: %d queued RQ jobs cancelled on queue %s",
                row.flow_name,
                row.run_id,
                statuses[row.run_id],
                cancelled,
                queue,
            )
    return report


def _failed(what: str, exc: Exception) -> str:
    message = f"could not {what}: {type(exc).__name__}: {redact_text(str(exc))}"
    log.warning("%s (workers skip the jobs of final runs all the same)", message)
    return message
