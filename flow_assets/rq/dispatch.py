"""dispatch="rq": a page step hands its jobs to RQ workers instead of calling the handler.

The page step enqueues one RQ job per record (or per ``batch_size`` records) on a queue
named after the flow, with deterministic job ids (``<flow>-<run>-p<page>-j<n>``), after
the page and its pending jobs are in the ledger. Jobs are JSON (``SERIALIZER``), never
pickle. ``rq worker`` processes run ``flow_assets.rq.worker.run_jobs``, which calls the
handler of the flow the job names, as the worker loaded it (``flow_assets.rq.guard``), and
acknowledge each outcome through the same ledger (see ``flow_assets.rq.worker``). When the
run is final its jobs still queued are cancelled (``cancel_run_jobs``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flow_assets.errors import FlowDefinitionError
from flow_assets.options import is_int_at_least

if TYPE_CHECKING:
    import redis

RUN_JOBS = "flow_assets.rq.worker.run_jobs"
ACK_SUCCESS = "flow_assets.rq.worker.ack_success"
ACK_FAILURE = "flow_assets.rq.worker.ack_failure"
# RQ's JSON serializer for every job of the package: records are JSON already, and reading
# JSON runs no code (reading a pickle can). Pass it to anything reading the jobs.
SERIALIZER = "json"
DISPATCH_MODES = ("inline", "rq")
# An RQ job in one of these states will not run again by itself: enqueue it anew.
_RERUN_STATES = {None, b"failed", b"stopped", b"canceled"}


@dataclass(frozen=True)
class RqDispatch:
    """How a flow's jobs are run by RQ workers (``Flow(dispatch=RqDispatch(...))``).

    ``dispatch="rq"`` is ``RqDispatch()``.

    Args:
        batch_size: records per RQ job; 1 (the default) is one job per record.
        retries: times RQ runs a job again after it raised, timed out, or its worker died
            (default 1). A job out of retries counts as failed (reason ``lost`` when its
            worker died).
        job_timeout: seconds a job may run before RQ stops it (default 180). Also bounds
            how soon a dead worker's job is found: RQ's maintenance (in any live worker)
            abandons it about 60 s after the forking worker's last heartbeat, or
            ``job_timeout`` + 60 s after it started under ``SimpleWorker``.
        queue: the RQ queue (default: the flow's name).

    Examples:
        >>> RqDispatch(batch_size=50, retries=2)
        RqDispatch(batch_size=50, retries=2, job_timeout=180, queue=None)
    """

    batch_size: int = 1
    retries: int = 1
    job_timeout: int = 180
    queue: str | None = None

    def __post_init__(self) -> None:
        for option, minimum in (("batch_size", 1), ("retries", 0), ("job_timeout", 1)):
            value = getattr(self, option)
            if not is_int_at_least(value, minimum):
                raise FlowDefinitionError(
                    f"RqDispatch option {option}={value!r} is invalid: expected an int >= {minimum}"
                )
        if self.queue is not None and not (isinstance(self.queue, str) and self.queue.strip()):
            raise FlowDefinitionError(
                f"RqDispatch option queue={self.queue!r} is invalid: expected a non-empty name"
            )


def resolve_dispatch(value: object, handler: Callable[..., Any]) -> RqDispatch | None:
    """The flow's RQ settings (None: inline); FlowDefinitionError if ``value`` is invalid."""
    if value == "inline":
        return None
    if value == "rq":
        value = RqDispatch()
    if not isinstance(value, RqDispatch):
        raise FlowDefinitionError(
            f"Flow option dispatch={value!r} is invalid: expected 'inline', 'rq' or an"
            " RqDispatch(...)"
        )
    handler_path(handler)  # fail at definition time, not in a worker
    return value


def handler_path(handler: Callable[..., Any]) -> str:
    """``module:qualname`` naming ``handler`` in the flow's jobs; it must resolve to it (a
    worker checks a job names the handler of the flow it loaded)."""
    module, qualname = getattr(handler, "__module__", None), getattr(handler, "__qualname__", "")
    path = f"{module}:{qualname}"
    try:
        found: Any = importlib.import_module(str(module))
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, TypeError):
        found = None
    if module in (None, "__main__") or found is not handler:
        raise FlowDefinitionError(
            f"Flow option handler={handler!r} cannot run on RQ workers: with dispatch='rq' the"
            " handler must be a function defined at the top level of an importable module"
            f" (jobs name it by its path; {path!r} does not resolve to it). Move it to a"
            " module, not a lambda, closure or __main__."
        )
    return path


def run_job_prefix(flow: str, run_id: str) -> str:
    """What every RQ job id of the run starts with (flow names have no ``-``)."""
    return f"{flow}-{run_id}-p"


def plan_jobs(
    flow: str, run_id: str, page_index: int, keys: Sequence[str], batch_size: int
) -> dict[str, str]:
    """Record key -> deterministic RQ job id (a page's keys are deterministic)."""
    prefix = f"{run_job_prefix(flow, run_id)}{page_index}-j"
    return {key: f"{prefix}{position // batch_size}" for position, key in enumerate(keys)}


# Removes from a queue (an RQ list of job ids) the ids starting with a prefix, in one pass
# and atomically: a worker pops either a job this removes or one it keeps, never both.
# O(queue length); the kept ids go back in their order.
def cancel_run_jobs(
    connection: redis.Redis, queue: str, flow: str, run_id: str, ttl_seconds: int
) -> int:
    """Cancel the run's jobs still waiting in ``queue``; how many. For a run that is final.

    They leave the queue in one atomic pass (by their deterministic ids), so no worker can
    start them; each is marked ``canceled`` (RQ's status) and expires after
    ``ttl_seconds`` (queued RQ jobs have no TTL of their own). Jobs already running or
    finished are left alone: a worker skips a job of a final run anyway, and an outcome
    acknowledged after finalization is recorded as late. Idempotent.
    """
    from rq import Queue  # imported here: a Flow import stays light
    from rq.job import Job, JobStatus

    from resources.live.lua_rq import remove_queued

    queue_key = Queue(queue, connection=connection).key
    removed = remove_queued(connection, queue_key, run_job_prefix(flow, run_id))
    with connection.pipeline(transaction=False) as pipe:
        for job_id in removed:
            key = Job.key_for(job_id)
            pipe.hset(key, "status", JobStatus.CANCELED.value)
            pipe.expire(key, ttl_seconds)
        pipe.execute()
    return len(removed)


def enqueue_jobs(
    connection: redis.Redis,
    settings: RqDispatch,
    *,
    queue: str,
    handler: str,
    flow: str,
    run_id: str,
    page_index: int,
    records: Mapping[str, Mapping[str, Any]],
    job_ids: Mapping[str, str],
    pending: set[str],
    key_ttl_seconds: int,
) -> int:
    """Enqueue the jobs holding pending keys, unless RQ will run them anyway; how many.

    A retried page finds its jobs queued, running or finished: those are left alone. A
    job RQ gave up on, or that vanished, is enqueued again with its pending keys only.
    """
    from rq import Callback, Queue, Retry  # imported here: a Flow import stays light

    batches: dict[str, list[str]] = {}
    for key, job_id in job_ids.items():
        if key in pending:
            batches.setdefault(job_id, []).append(key)
    to_enqueue = _not_in_rq(connection, list(batches))
    if not to_enqueue:
        return 0
    meta = {"flow": flow, "run_id": run_id, "page_index": page_index, "ttl": key_ttl_seconds}
    datas = [
        Queue.prepare_data(
            RUN_JOBS,
            args=(
                handler,
                flow,
                run_id,
                page_index,
                batches[job_id],
                [records[key] for key in batches[job_id]],
            ),
            job_id=job_id,
            timeout=settings.job_timeout,
            retry=Retry(max=settings.retries) if settings.retries else None,
            failure_ttl=key_ttl_seconds,
            meta=dict(meta),
            description=f"flow {flow} run {run_id} page {page_index}: {len(batches[job_id])} jobs",
            on_success=Callback(ACK_SUCCESS),
            on_failure=Callback(ACK_FAILURE),
        )
        for job_id in to_enqueue
    ]
    rq_queue = Queue(queue, connection=connection, serializer=SERIALIZER)
    with connection.pipeline() as pipe:
        rq_queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    return len(datas)


def _not_in_rq(connection: redis.Redis, job_ids: list[str]) -> list[str]:
    """The jobs RQ will not run as they stand (gave up on them, or has no such job)."""
    from rq.job import Job

    if not job_ids:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        states = pipe.execute()
    return [job_id for job_id, state in zip(job_ids, states, strict=True) if state in _RERUN_STATES]
