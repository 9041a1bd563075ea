"""dispatch="rq" after the run is final: its queued jobs are cancelled, a worker skips any
job of a final run, an outcome acknowledged after finalization is recorded as late (never
counted, never lost), and a long job keeps its run alive.

Real ``rq worker`` processes, real Redis and PostgreSQL/SQLite, real Dagster runs and
finalizer ticks; the RQ callbacks called by hand are the ones workers call, on jobs
fetched from Redis."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import redis
from rq import Queue
from rq.job import Job

from flow_assets.flow import Flow
from flow_assets.rq.dispatch import SERIALIZER, RqDispatch
from flow_assets.rq.worker import ack_failure, ack_success
from flow_assets.sources.base import Page
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger import db, run_queries
from resources.ledger.ledger import Ledger
from resources.ledger.records import FinalState, RunRow
from resources.live.counters import LiveCounters
from resources.live.lua import Outcome
from resources.run_policy import RunPolicy
from sensors.finalizer import FlowPolicy, finalize_runs
from tests.dagster import settle_flows
from tests.dagster.rq_flows import rq_workers, wait_for
from tests.dagster.settle_flows import handled_keys, write_jsonl
from tests.flowkit import NoSource, assert_counts, make_defs, row_of, run_flow, tick
from tests.ledger_helpers import process_page, release_failed_keys

FLOW = "late_orders"
KEYS = [f"r{n:02d}" for n in range(20)]  # two pages of 10, one RQ job per record


def late_flow(data: Path, **options: Any) -> Flow:
    settings: dict[str, Any] = {
        "dispatch": RqDispatch(retries=0, job_timeout=120),
        "pages_per_step": 2,
        **options,
    }
    return Flow(
        name=FLOW,
        source=FileSource(str(data), page_size=10),
        key="id",
        handler=settle_flows.handle,
        **settings,
    )


def agrees_with_ledger(store: Ledger, row: RunRow) -> None:
    """The final row is the ledger's totals, jobs that can no longer finish counted failed."""
    ledger = store.page_totals([row.run_id])[row.run_id].counts
    assert row.counts == replace(ledger, failed=ledger.failed + ledger.pending), (row, ledger)


def finalize_by_hand(store: Ledger, run_id: str) -> RunRow:
    """Finalize as the finalizer would, but without anything after its write (as when the
    finalizer crashed right after committing its final rows)."""
    totals = store.page_totals([run_id])[run_id]
    counts = totals.counts
    final = FinalState(
        run_id,
        "failed",
        replace(counts, failed=counts.failed + counts.pending),
        totals.pages_done,
        datetime.now(timezone.utc),
        f"stalled: {counts.pending} jobs lost",
    )
    assert store.finalize_many([final]) == [run_id]
    return store.runs(run_id=run_id)[0]


def job_states(redis_url: str, job_ids: list[str]) -> list[str | None]:
    connection = redis.Redis.from_url(redis_url)
    try:
        return [
            job.get_status(refresh=False) if job else None
            for job in Job.fetch_many(job_ids, connection=connection, serializer=SERIALIZER)
        ]
    finally:
        connection.close()


def queue_length(redis_url: str, queue: str) -> int:
    connection = redis.Redis.from_url(redis_url)
    try:
        return Queue(queue, connection=connection, serializer=SERIALIZER).count
    finally:
        connection.close()


# ----------------------------------------------------------------- real workers, real runs


def test_a_long_job_keeps_its_run_alive_then_its_late_outcome_is_recorded_not_counted(
    database_url: str,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    """One worker; r03 fails; r05's handler runs long (until the test opens its gate), so
    r06..r19 wait in the queue behind it.

    The worker's heartbeat keeps the run alive past its 3 s deadline. A finalizer deciding
    later (``now`` an hour on) finalizes it as stalled with 15 jobs lost and cancels the 14
    queued jobs. r05 then completes: its ack is recorded as late, the final row still
    agrees with the ledger, no cancelled job ever runs. With dedup="flow" the next run
    dispatches exactly the failed and lost records, not r05 (it did complete)."""
    gate, started, broken = tmp_path / "gate", tmp_path / "started", tmp_path / "broken"
    handled = tmp_path / "handled.txt"
    broken.touch()
    records: list[dict[str, Any]] = [{"id": key} for key in KEYS]
    records[3]["fail_while"] = str(broken)
    records[5].update(wait_for=str(gate), started=str(started))
    flow = late_flow(
        write_jsonl(records, tmp_path / "orders.jsonl"),
        deadline=timedelta(seconds=3),
        dedup="flow",
    )
    defs = make_defs([flow], redis_url, database_url)
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    env = {"FLOW_DATABASE_URL": database_url, "FLOW_TEST_HANDLED": str(handled)}
    policies = {FLOW: FlowPolicy(tolerance=flow.tolerance, deadline=flow.deadline)}

    with rq_workers(1, FLOW, redis_url, env, tmp_path, "rq.worker.SimpleWorker") as workers:
        result = run_flow(defs, FLOW, instance)
        assert result.success
        run_id = result.run_id
        wait_for(started.exists, 120, f"r05's job to start; worker log:\n{workers.tail()}")
        time.sleep(4)  # past the deadline: only the worker's heartbeat moves the run's clock
        tick(defs, instance)
        row = row_of(database_url, run_id)
        assert row.flow_status == "running", row.failure_reason

        later = datetime.now(timezone.utc) + timedelta(hours=1)
        # The worker's heartbeat still moves the row (every 0.75 s): a final write decided
        # before a beat is skipped, and the next tick decides again, as in production.
        for _ in range(20):
            report = finalize_runs(instance, store, counters, policies, now=later)
            if report.finalized:
                break
        assert report.finalized == {run_id: "failed"}
        row = row_of(database_url, run_id)
        assert row.failure_reason == "stalled: 15 jobs lost (none finished by the deadline)"
        assert_counts(row, Counts(20, 20, completed=4, failed=16))
        agrees_with_ledger(store, row)
        assert queue_length(redis_url, FLOW) == 0  # r06..r19 cancelled
        queued = [f"{FLOW}-{run_id}-p0-j{n}" for n in range(6, 10)]
        queued += [f"{FLOW}-{run_id}-p1-j{n}" for n in range(10)]
        assert set(job_states(redis_url, queued)) == {"canceled"}

        gate.touch()  # r05 completes, after its run is final
        wait_for(lambda: store.late_jobs([run_id]) == {run_id: 1}, 60, "r05's late ack")
        time.sleep(2)  # the worker would now take any job left in the queue
        assert handled_keys(handled) == KEYS[:6]
        assert row_of(database_url, run_id) == row  # unchanged, and still the ledger's
        agrees_with_ledger(store, row)
        [late] = store.late_outcomes(run_id)
        assert (late["record_key"], late["outcome"], late["error"]) == ("r05", "completed", None)

        broken.unlink()
        handled.unlink()
        second = run_flow(defs, FLOW, instance)
        assert second.success

        def settled() -> bool:
            return store.page_totals([second.run_id])[second.run_id].counts.pending == 0

        wait_for(settled, 120, f"run 2's jobs; worker log:\n{workers.tail()}")
    tick(defs, instance)
    retried = sorted([KEYS[3], *KEYS[6:]])
    assert sorted(handled_keys(handled)) == retried
    row = row_of(database_url, second.run_id)
    assert_counts(row, Counts(20, 15, skipped=5, completed=15))
    assert row.flow_status == "partial_success"


def test_a_stalled_run_s_jobs_are_cancelled_when_it_is_finalized(
    sqlite_url: str, redis_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """The issue: no worker runs; the sensor finalizes the run as stalled with its 20 jobs
    lost. Its jobs are no longer queued: a worker started afterwards runs none of them."""
    handled = tmp_path / "handled.txt"
    flow = late_flow(
        write_jsonl([{"id": key} for key in KEYS], tmp_path / "orders.jsonl"),
        deadline=timedelta(seconds=1),
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, FLOW, instance)
    assert result.success
    assert queue_length(redis_url, FLOW) == 20
    time.sleep(1.5)
    tick(defs, instance)
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "failed"
    assert row.failure_reason == "stalled: 20 jobs lost (none finished by the deadline)"

    assert queue_length(redis_url, FLOW) == 0
    env = {"FLOW_DATABASE_URL": sqlite_url, "FLOW_TEST_HANDLED": str(handled)}
    with rq_workers(1, FLOW, redis_url, env, tmp_path, "rq.worker.SimpleWorker"):
        time.sleep(4)
    assert handled_keys(handled) == []
    assert row_of(sqlite_url, result.run_id) == row
    agrees_with_ledger(Ledger(url=sqlite_url), row)


def test_a_worker_skips_the_jobs_of_a_final_run(
    sqlite_url: str, redis_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """The finalizer died between writing the final row and cancelling the jobs: they are
    still queued. A worker takes each one, sees the run is final in the ledger, and skips
    it without calling the handler; nothing in the ledger changes."""
    handled = tmp_path / "handled.txt"
    flow = late_flow(write_jsonl([{"id": key} for key in KEYS], tmp_path / "orders.jsonl"))
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, FLOW, instance)
    assert result.success
    store = Ledger(url=sqlite_url)
    row = finalize_by_hand(store, result.run_id)
    assert queue_length(redis_url, FLOW) == 20

    job_ids = [f"{FLOW}-{result.run_id}-p{p}-j{n}" for p in range(2) for n in range(10)]
    env = {"FLOW_DATABASE_URL": sqlite_url, "FLOW_TEST_HANDLED": str(handled)}
    with rq_workers(1, FLOW, redis_url, env, tmp_path, "rq.worker.SimpleWorker") as workers:

        def all_done() -> bool:
            return set(job_states(redis_url, job_ids)) == {"finished"}

        wait_for(all_done, 120, f"the worker to take every job; log:\n{workers.tail()}")
    assert handled_keys(handled) == []
    assert row_of(sqlite_url, result.run_id) == row
    agrees_with_ledger(store, row)
    assert store.late_jobs([result.run_id]) == {result.run_id: 0}
    connection = redis.Redis.from_url(redis_url)
    try:
        outcome = Job.fetch(job_ids[0], connection=connection, serializer=SERIALIZER).return_value()
    finally:
        connection.close()
    assert outcome is not None
    assert (outcome["completed"], outcome["failed"]) == ([], {})
    assert "is failed" in outcome["skipped"]


# ------------------------------------------------------ acks after finalization, directly


@pytest.fixture
def dispatched(
    redis_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, LiveCounters, Ledger, list[Job]]:
    """A running dedup="flow" run whose page 0 (a..f) went to RQ as three jobs of two."""
    monkeypatch.setenv("FLOW_DATABASE_URL", database_url)  # as on a worker
    flow = Flow(
        name=FLOW,
        source=NoSource(),
        key="id",
        handler=settle_flows.handle,
        dispatch=RqDispatch(batch_size=2),
        dedup="flow",
    )
    counters, store = LiveCounters(url=redis_url), Ledger(url=database_url)
    run_id = "run-late-1"
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc), flow.run_policy())
    counters.start_run(FLOW, run_id)
    process_page(flow, run_id, Page(0, [{"id": k} for k in "abcdef"]), counters, store)
    jobs = Queue(FLOW, connection=counters.rq_connection(), serializer=SERIALIZER).get_jobs()
    assert [job.args[4] for job in jobs] == [["a", "b"], ["c", "d"], ["e", "f"]]
    return run_id, counters, store, jobs


def test_an_ack_after_the_run_is_final_is_late_visible_and_not_counted(
    dispatched: tuple[str, LiveCounters, Ledger, list[Job]],
) -> None:
    run_id, counters, store, (ab, cd, ef) = dispatched
    conn = counters.rq_connection()
    assert ack_success(ab, conn, {"completed": ["a"], "failed": {"b": "refused"}}) is not None
    row = finalize_by_hand(store, run_id)
    assert_counts(row, Counts(6, 6, completed=1, failed=5))
    live = counters.totals(FLOW, run_id)

    late = ack_success(cd, conn, {"completed": ["c"], "failed": {"d": "no"}})
    agrees_with_ledger(store, row)  # the outcome changed no count the final row came from
    assert late is Outcome.LATE
    assert ack_success(cd, conn, {"completed": ["c"], "failed": {"d": "no"}}) is Outcome.NOOP
    assert ack_success(ab, conn, {"completed": ["a", "b"], "failed": {}}) is Outcome.LATE
    ef.retries_left = 0
    assert ack_failure(ef, conn, ValueError, ValueError("down"), None) is Outcome.LATE
    assert ack_failure(ef, conn, ValueError, ValueError("down"), None) is Outcome.NOOP

    assert store.runs(run_id=run_id)[0] == row  # the final row is untouched...
    agrees_with_ledger(store, row)  # ...and still the ledger's totals
    assert counters.totals(FLOW, run_id) == live  # the run's live counters too
    assert store.late_jobs([run_id, "other"]) == {run_id: 5, "other": 0}
    outcomes = {o["record_key"]: (o["outcome"], o["error"]) for o in store.late_outcomes(run_id)}
    assert outcomes == {
        "b": ("completed", "refused"),  # failed, counted failed, then completed late
        "c": ("completed", None),
        "d": ("failed", "no"),
        "e": ("failed", "ValueError: down"),
        "f": ("failed", "ValueError: down"),
    }
    assert [f.record_key for f in store.job_failures(run_id)] == ["b"]  # as counted

    # dedup="flow": the final write released every lost key; b and c did complete late, so
    # their acks claimed them again; d, e, f stay released (nothing is left to release).
    assert release_failed_keys(store, [run_id]) == 0
    store.start_run("probe", FLOW, None, datetime.now(timezone.utc), RunPolicy(dedup="flow"))
    claimed = store.claim_flow_keys(FLOW, "probe", 0, list("abcdef"))
    assert [key for key, mine in zip("abcdef", claimed, strict=True) if mine] == ["d", "e", "f"]


def test_a_late_success_after_the_release_claims_its_key_again(
    dispatched: tuple[str, LiveCounters, Ledger, list[Job]],
) -> None:
    """The keys were released at finalization (the jobs counted lost), then a job that was
    still running completes: its record was handled, so the next run must not dispatch it."""
    run_id, counters, store, (ab, _, _) = dispatched
    finalize_by_hand(store, run_id)  # the final write releases the 6 lost keys itself
    assert release_failed_keys(store, [run_id]) == 0
    assert ack_success(ab, counters.rq_connection(), {"completed": ["a", "b"], "failed": {}}) is (
        Outcome.LATE
    )
    assert release_failed_keys(store, [run_id]) == 0
    store.start_run("probe", FLOW, None, datetime.now(timezone.utc), RunPolicy(dedup="flow"))
    claimed = store.claim_flow_keys(FLOW, "probe", 0, list("abcdef"))
    assert [key for key, mine in zip("abcdef", claimed, strict=True) if mine] == list("cdef")


# PostgreSQL only: SQLite serializes writers at BEGIN IMMEDIATE, so no such interleaving.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_ack_racing_the_final_write_waits_for_it_and_is_late(
    dispatched: tuple[str, LiveCounters, Ledger, list[Job]], database_url: str
) -> None:
    """An ack arriving while the finalizer's transaction holds the run's row: it waits for
    that transaction, then sees the run final and records its outcome as late (never an
    outcome counted after the final row was computed)."""
    run_id, counters, store, (ab, _, _) = dispatched
    totals = store.page_totals([run_id])[run_id]
    final = FinalState(
        run_id,
        "failed",
        Counts(6, 6, failed=6),
        totals.pages_done,
        datetime.now(timezone.utc),
        "stalled: 6 jobs lost",
    )
    outcome: list[Outcome] = []
    ack = threading.Thread(
        target=lambda: outcome.append(
            ack_success(ab, counters.rq_connection(), {"completed": ["a", "b"], "failed": {}})
        )
    )
    with db.transaction(store.engine(), write=True, retry_seconds=5) as conn:
        assert run_queries.finalize_many(conn, [final]) == [run_id]
        ack.start()
        ack.join(timeout=1.0)
        assert ack.is_alive()  # waiting for the finalizer's transaction
    ack.join(timeout=30)
    assert outcome == [Outcome.LATE]
    agrees_with_ledger(store, store.runs(run_id=run_id)[0])
    assert store.late_jobs([run_id]) == {run_id: 2}


def test_a_reopened_run_counts_the_outcomes_that_came_in_late(
    dispatched: tuple[str, LiveCounters, Ledger, list[Job]],
) -> None:
    """A run decided too early (stalled) is reopened when its Dagster run ends: the job
    outcomes acknowledged while it was final now count, so they are not counted lost."""
    run_id, counters, store, (ab, cd, _) = dispatched
    finalize_by_hand(store, run_id)
    conn = counters.rq_connection()
    assert ack_success(ab, conn, {"completed": ["a", "b"], "failed": {}}) is Outcome.LATE
    assert (
        ack_success(cd, conn, {"completed": [], "failed": {"c": "no", "d": "no"}}) is Outcome.LATE
    )
    assert store.late_jobs([run_id]) == {run_id: 4}

    assert store.reopen(run_id)
    assert store.late_jobs([run_id]) == {run_id: 0}
    counts = store.page_totals([run_id])[run_id].counts
    assert (counts.completed, counts.failed, counts.pending) == (2, 2, 2)
