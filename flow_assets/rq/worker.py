"""What RQ workers run for flows with dispatch="rq": the handler, then idempotent acks.

Start workers with the package importable and the ledger's URL in the environment::

    FLOW_DATABASE_URL=postgresql+psycopg://... \\
        rq worker --url redis://redis-host:6379/0 orders -c flow_assets.rq_settings

(``orders`` is the flow's queue; ``-c flow_assets.rq_settings`` preloads this module, and
the modules in ``FLOW_RQ_PRELOAD``, so the work horse RQ forks per job starts warm, and
makes the worker refuse any job that is not one of the loaded flows: see
``flow_assets.rq.guard``). The
forking worker isolates each job but pays a fork and a database connection per job;
``-w rq.worker.SimpleWorker`` runs jobs in the worker process, several times faster for
short jobs. Add workers on any machine that reaches the Redis server and the database to
scale out. A job whose worker died is failed or retried by RQ's maintenance in any live
worker (``--maintenance-interval``); see ``RqDispatch.job_timeout``.

``run_jobs`` is the job: it calls the handler of the flow the job names, as the worker
loaded it (a job of a flow the worker did not load fails; nothing named by a job is
imported), with a ``JobBatch``, heartbeating the run while the handler works (a long job
keeps its run alive). A job of a run that is already final (finalized as stalled, failed
or cancelled while the job waited in the queue) is skipped: the handler is not called;
unless the run awaits its Dagster run (``RunGate.runs_jobs``).
The job's RQ callbacks acknowledge its outcome: ``ack_success`` (the outcomes the handler
reported) and ``ack_failure`` (the job raised, timed out, or its worker died; only once RQ
will not retry it). An ack is a guarded transition in SQL (the source of truth) then in
the run's Redis counters, so a repeated or duplicated callback changes nothing; an ack
that arrives after the run was final is recorded as late in the ledger and counted
nowhere (``Outcome.LATE``). The ledger is the Dagster-free ``Ledger``; Dagster comes in
only with the flows module the worker loads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from rq.exceptions import AbandonedJobError, DeserializationError
from rq.job import Job
from rq.timeouts import BaseTimeoutException

from flow_assets.dispatch import JobBatch, error_text, handler_error_text
from flow_assets.errors import HandlerError
from flow_assets.heartbeat import heartbeat, heartbeat_interval
from flow_assets.rq import guard as rq_guard
from resources.ledger.ledger import Ledger
from resources.live import lua_rq
from resources.live.lua import Outcome
from resources.run_policy import RunPolicy

if TYPE_CHECKING:
    from flow_assets.flow import Flow

log = logging.getLogger(__name__)

LOST_ERROR = "lost: the worker running the job died (RQ AbandonedJobError)"
COUNTERS_LOST = "Redis lost the run's counters while workers acked jobs; totals are the ledger's"


def run_jobs(
    handler_path: str,
    flow: str,
    run_id: str,
    page_index: int,
    keys: Sequence[str],
    records: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The RQ job: call the handler on the records; their outcomes, for ``ack_success``.

    The handler is the one of the flow named ``flow`` that this worker loaded, and must be
    the one ``handler_path`` names; otherwise ``rq_guard.JobRefusedError``. A job of a run
    that is final in the ledger (or unknown to it) is skipped without calling the handler:
    its jobs were counted failed (lost) when the run was finalized. The result then says
    why under ``skipped``, with no outcome to acknowledge. A run declared stalled while its
    Dagster run still works is not final yet in that sense: its jobs run, their outcomes
    are recorded as late, and they count when the run is decided again.

    A handler that raises fails the job with a ``JobHandlerError`` chained to nothing: RQ
    logs it and keeps it in Redis, so it shows the error as the flow's ``error_detail``
    allows; the failed jobs' rows get the whole message (secrets redacted).
    """
    loaded = rq_guard.flow_for(flow, handler_path)  # first: a refused job runs nothing
    gate = _ledger().run_gate(run_id)
    if gate is None or not gate.runs_jobs:
        why = f"run {run_id} is {gate.status} in the ledger" if gate else f"run {run_id} is unknown"
        log.warning("flow %s page %d: %s; job skipped, handler not called", flow, page_index, why)
        return {"completed": [], "failed": {}, "skipped": f"not run: {why}"}
    batch = JobBatch(keys, records)
    deadline = (gate.policy or RunPolicy()).deadline
    with heartbeat(_ledger(), run_id, heartbeat_interval(deadline)):
        failure = _call_handler(loaded, page_index, batch)
    if failure is not None:
        # Raised here, outside any `except`: chained to nothing, not even as __context__.
        raise failure
    batch.finish()
    failures = batch.failures
    completed = [key for key in keys if key not in failures]
    return {"completed": completed, "failed": failures, "error_detail": loaded.error_detail}


class JobHandlerError(HandlerError):
    """A flow's handler raised in a worker: the message is what the flow's ``error_detail``
    shows; ``job_error`` is the failed jobs' rows' text (``error_text``, full)."""

    def __init__(self, message: str, job_error: str = "") -> None:
        super().__init__(message)
        self.job_error = job_error


def _call_handler(flow: Flow, page_index: int, batch: JobBatch) -> JobHandlerError | None:
    """Run the handler; the error to fail the job with if it raised (RQ's timeouts pass)."""
    try:
        flow.handler(batch)
    except BaseTimeoutException:
        raise
    except Exception as exc:
        message = handler_error_text(flow.name, page_index, exc, flow.error_detail)
        return JobHandlerError(message, error_text(exc))
    return None


def ack_success(
    job: Job, connection: redis.Redis, result: Any, *args: Any, **kwargs: Any
) -> Outcome:
    """RQ success callback: acknowledge the outcomes ``run_jobs`` returned.

    RQ then keeps the result in Redis: its failures are left there as the flow's
    ``error_detail`` shows them (the ledger has them whole)."""
    if result.get("skipped"):
        return Outcome.NOOP  # the run was final: nothing ran, nothing to acknowledge
    completed, failed = result["completed"], result["failed"]
    try:
        return acknowledge(connection, job, completed=completed, failed=failed)
    finally:
        detail = result.get("error_detail", "masked")
        result["failed"] = {key: error_text(text, detail) for key, text in failed.items()}


def ack_failure(
    job: Job, connection: redis.Redis, exc_type: type[BaseException] | None, exc: Any, tb: Any
) -> Outcome | None:
    """RQ failure callback: the job's pending records failed, unless RQ retries the job."""
    if job.should_retry:
        log.info("job %s failed (%s); RQ retries it (%s left)", job.id, exc_type, job.retries_left)
        return None
    if exc_type is AbandonedJobError or isinstance(exc, AbandonedJobError):
        error = LOST_ERROR
    elif isinstance(exc, JobHandlerError):
        error = exc.job_error  # the whole message, for the failed jobs' rows only
    else:
        error = error_text(exc if isinstance(exc, BaseException) else f"{exc_type}: {exc}")
    try:
        keys = job.args[4] if rq_guard.is_package_job(job) else None
    except DeserializationError:  # not JSON: not a job of this package, nothing to count
        keys = None
    if keys is None:
        log.warning("job %s failed and is not a job of this package; not acknowledged", job.id)
        return None
    return acknowledge(connection, job, completed=[], failed=dict.fromkeys(keys, error))


def acknowledge(
    connection: redis.Redis,
    job: Job,
    *,
    completed: Sequence[str],
    failed: Mapping[str, str],
) -> Outcome:
    """Apply a job's outcomes to the ledger, then to the live counters; what Redis did.

    Returns ``NOOP`` when every transition had happened before (a repeated callback), and
    ``LATE`` when the run was final: the outcomes are recorded as late in the ledger, not
    counted (the final row was computed without them), and the live counters are left
    alone. A late success of a ``dedup="flow"`` run claims its key again, in the same
    transaction, if the finalizer had released it: the record was handled after all.
    """
    flow, run_id, ttl = job.meta["flow"], job.meta["run_id"], int(job.meta["ttl"])
    result = _ledger().ack_jobs(flow, run_id, completed, failed)
    if result.run_final:
        if not result.late:
            return Outcome.NOOP
        log.warning(
            "flow %s run %s is final: %d outcomes of job %s arrived late; recorded, not counted",
            flow,
            run_id,
            result.late,
            job.id,
        )
        return Outcome.LATE
    outcome = Outcome.NOOP
    for page_index, delta in sorted(result.deltas.items()):
        if not delta:
            continue
        # RQ hands the callback its own connection (raw replies): the script runs on it.
        outcome = lua_rq.ack_jobs(
            connection,
            flow,
            run_id,
            page_index,
            ttl,
            completed=delta.completed,
            failed=delta.failed,
            recovered=delta.recovered,
        )
        if outcome is Outcome.LOST:
            # The ledger has the outcome; the next page step (or the finalizer) rebuilds
            # the counters from it. Note it on the run while it is running.
            _ledger().note_counter_mismatch(run_id, COUNTERS_LOST)
            break
    return outcome


def _ledger() -> Ledger:
    """The ledger of $FLOW_DATABASE_URL (the worker never migrates: ``flowctl db upgrade``)."""
    return Ledger(auto_migrate=False)
