"""dispatch="rq" on real Redis, real PostgreSQL/SQLite, real RQ queues and real ``rq worker``
processes (one SIGKILLed mid-job), real Dagster runs and finalizer ticks. Nothing is faked: the
RQ callbacks called by hand are the ones the workers call, on jobs fetched from Redis."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import redis
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.registry import FailedJobRegistry

from flow_assets.cli import runner
from flow_assets.errors import FlowDefinitionError
from flow_assets.flow import Flow
from flow_assets.rq.dispatch import SERIALIZER, RqDispatch
from flow_assets.rq.worker import LOST_ERROR, ack_failure, ack_success
from flow_assets.sources.base import Page
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from resources.live.lua import Outcome
from tests.dagster import rq_flows
from tests.dagster.rq_flows import rq_workers, wait_for
from tests.flowkit import (
    assert_conserved,
    assert_counts,
    make_defs,
    row_of,
    run_flow,
    run_keys_left,
    tick,
)
from tests.ledger_helpers import process_page

FLOW = "rq_orders"


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def rq_flow(data: Path, **options: Any) -> Flow:
    settings = {
        "source": FileSource(str(data), page_size=100),
        "handler": rq_flows.handle,
        "pages_per_step": 5,
        **options,
    }
    return Flow(name=FLOW, key="id", **settings)


# --------------------------------------------------------------------- declaring the option


@pytest.mark.parametrize("dispatch", ["celery", "", None, 3, "RQ"])
def test_an_unknown_dispatch_mode_is_refused_naming_the_valid_ones(
    dispatch: object, tmp_path: Path
) -> None:
    with pytest.raises(FlowDefinitionError, match=r"dispatch=.*expected 'inline', 'rq'"):
        rq_flow(tmp_path / "x.jsonl", dispatch=dispatch)


def test_an_rq_handler_must_be_importable_by_workers(tmp_path: Path) -> None:
    with pytest.raises(FlowDefinitionError, match="top level of an importable module"):
        rq_flow(tmp_path / "x.jsonl", dispatch="rq", handler=lambda batch: None)
    flow = rq_flow(tmp_path / "x.jsonl", dispatch=RqDispatch(batch_size=10, queue="bulk"))
    assert flow.handler_path == "tests.dagster.rq_flows:handle"
    assert flow.queue_name == "bulk"
    assert rq_flow(tmp_path / "x.jsonl").queue_name is None  # inline


@pytest.mark.parametrize(
    ("option", "value"), [("batch_size", 0), ("retries", -1), ("job_timeout", 1.5), ("queue", "")]
)
def test_invalid_rq_settings_are_refused(option: str, value: object) -> None:
    with pytest.raises(FlowDefinitionError, match=f"RqDispatch option {option}="):
        RqDispatch(**{option: value})  # type: ignore[arg-type]


# -------------------------------------------------- page step and acks, no worker needed


@pytest.fixture
def started(
    redis_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Flow, str, LiveCounters, Ledger]:
    """A running flow run with dispatch="rq"; FLOW_DATABASE_URL set as on a worker."""
    monkeypatch.setenv("FLOW_DATABASE_URL", database_url)
    flow = rq_flow(tmp_path / "unused.jsonl", dispatch=RqDispatch(batch_size=2))
    counters, store = LiveCounters(url=redis_url), Ledger(url=database_url)
    run_id = "run-rq-1"
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc))
    counters.start_run(FLOW, run_id)
    return flow, run_id, counters, store


def queued_jobs(counters: LiveCounters, queue: str) -> list[Job]:
    return Queue(queue, connection=counters.rq_connection(), serializer=SERIALIZER).get_jobs()


def test_a_retried_page_enqueues_each_job_once_and_keeps_its_acks(
    started: tuple[Flow, str, LiveCounters, Ledger],
) -> None:
    flow, run_id, counters, store = started
    page = Page(0, [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "a"}, {"oops": 1}])

    got = process_page(flow, run_id, page, counters, store)

    assert got == Counts(source=5, dispatched=3, skipped=1, rejected=1)
    jobs = queued_jobs(counters, "rq_orders")
    assert [(job.id, job.args[4]) for job in jobs] == [
        (f"rq_orders-{run_id}-p0-j0", ["a", "b"]),
        (f"rq_orders-{run_id}-p0-j1", ["c"]),
    ]
    first = jobs[0]
    outcome = {"completed": ["a"], "failed": {"b": "x"}}
    assert ack_success(first, counters.rq_connection(), outcome) is Outcome.DONE
    # The page step runs again (a step retry): nothing is enqueued twice, acks stay.
    assert process_page(flow, run_id, page, counters, store) == got
    assert len(queued_jobs(counters, "rq_orders")) == 2
    expected = Counts(source=5, dispatched=3, skipped=1, rejected=1, completed=1, failed=1)
    totals = store.page_totals([run_id])[run_id]
    assert (totals.counts, totals.pages_done) == (expected, 0)
    assert counters.totals(FLOW, run_id) == expected
    assert store.runs(run_id=run_id)[0].counter_mismatch is None  # Redis never lost the run


def test_acks_are_guarded_transitions_in_sql_and_redis(
    started: tuple[Flow, str, LiveCounters, Ledger],
) -> None:
    flow, run_id, counters, store = started
    page = Page(3, [{"id": k} for k in "abcdef"])
    process_page(flow, run_id, page, counters, store)
    conn = counters.rq_connection()
    ab, cd, ef = queued_jobs(counters, "rq_orders")

    def counts() -> Counts:
        ledger = store.page_totals([run_id])[run_id].counts
        assert counters.totals(FLOW, run_id) == ledger  # Redis stays equal to the ledger
        return ledger

    both = {"completed": ["a", "b"], "failed": {}}
    assert ack_success(ab, conn, both) is Outcome.DONE
    assert ack_success(ab, conn, both) is Outcome.NOOP  # a duplicated success callback
    assert counts() == Counts(source=6, dispatched=6, completed=2)

    cd.retries_left = 1  # RQ will run it again: not an outcome yet
    assert ack_failure(cd, conn, ConnectionError, ConnectionError("down"), None) is None
    cd.retries_left = 0
    assert ack_failure(cd, conn, AbandonedJobError, AbandonedJobError(), None) is Outcome.DONE
    assert ack_failure(cd, conn, AbandonedJobError, AbandonedJobError(), None) is Outcome.NOOP
    assert counts() == Counts(source=6, dispatched=6, completed=2, failed=2)
    failures = {f.record_key: f.error for f in store.job_failures(run_id)}
    assert failures == {"c": LOST_ERROR, "d": LOST_ERROR}

    # A late failure of completed jobs changes nothing; a requeued job completes them.
    ab.retries_left = 0
    assert ack_failure(ab, conn, ValueError, ValueError("late"), None) is Outcome.NOOP
    assert ack_success(cd, conn, {"completed": ["c", "d"], "failed": {}}) is Outcome.DONE
    assert counts() == Counts(source=6, dispatched=6, completed=4)
    assert store.job_failures(run_id) == []
    assert ack_success(ef, conn, {"completed": ["e"], "failed": {"f": "no"}}) is Outcome.ZERO
    assert ack_success(ef, conn, {"completed": ["e", "f"], "failed": {}}) is Outcome.ZERO
    assert counts() == Counts(source=6, dispatched=6, completed=6)
    assert store.page_totals([run_id])[run_id].pages_done == 1
    assert store.runs(run_id=run_id)[0].counter_mismatch is None

    # Redis rebuilt from the ledger (after a loss) holds the same numbers.
    counters.delete_run(FLOW, run_id)
    counters.rebuild(FLOW, run_id, store.claimed_keys(run_id), store.page_counts(run_id))
    assert counts() == Counts(source=6, dispatched=6, completed=6)


def test_an_ack_after_redis_lost_the_run_lands_in_the_ledger_and_is_noted(
    started: tuple[Flow, str, LiveCounters, Ledger],
) -> None:
    flow, run_id, counters, store = started
    process_page(flow, run_id, Page(0, [{"id": "a"}]), counters, store)
    [job] = queued_jobs(counters, "rq_orders")
    counters.delete_run(FLOW, run_id)

    assert (
        ack_success(job, counters.rq_connection(), {"completed": ["a"], "failed": {}})
        is Outcome.LOST
    )

    assert store.page_totals([run_id])[run_id].counts == Counts(1, 1, 0, 0, 1, 0)
    [row] = store.runs(run_id=run_id)
    assert row.counter_mismatch is not None and "Redis lost" in row.counter_mismatch


# --------------------------------------------------------- real workers, one killed mid-job


def orders(count: int, tmp_path: Path, hang: Path, **extra: Any) -> list[dict[str, Any]]:
    """``count`` unique ids; every 50th fails; one hangs on its first attempt; plus 30
    duplicates and 20 records without an id."""
    records: list[dict[str, Any]] = []
    for n in range(count):
        record: dict[str, Any] = {"id": f"o{n:05d}", "fail": n % 50 == 7}
        if n == count * 3 // 4:
            record["hang"] = str(hang)
        records.append(record)
    for n in range(30):
        records.insert(200 + 11 * n, {"id": f"o{n * 13 % count:05d}", "fail": False})
    for n in range(20):
        records.insert(100 + 17 * n, {"name": "no id"})
    return records


@pytest.mark.parametrize(
    ("ledger", "jobs", "retries", "lost", "worker_class"),
    [
        ("postgres", 2000, 1, 0, "tests.dagster.rq_flows.QuickAbandonSimpleWorker"),
        ("sqlite", 300, 0, 1, "tests.dagster.rq_flows.QuickAbandonWorker"),
    ],
    ids=["pg-2000-retried-simple-workers", "sqlite-300-lost-forking-workers"],
)
def test_two_workers_one_killed_mid_job_give_exact_counts(
    ledger: str,
    jobs: int,
    retries: int,
    lost: int,
    worker_class: str,
    request: pytest.FixtureRequest,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two real ``rq worker`` processes run the jobs; the one running the hanging job is
    SIGKILLed (with its work horse, for forking workers). RQ's registry cleanup in the
    surviving worker finds the abandoned job once its heartbeat expired (RQ's grace cut to
    5 s, ``rq_flows.QuickAbandonWorker``): with a retry left it runs
    again and completes, without one it is counted failed (reason lost). A duplicated success
    callback of a finished job changes nothing. The run is finalized with exact counts."""
    database_url = str(request.getfixturevalue(f"{ledger}_url"))
    monkeypatch.setenv("FLOW_DATABASE_URL", database_url)  # as on the workers (a late ack)
    hang, handled = tmp_path / "hung.pid", tmp_path / "handled.txt"
    records = orders(jobs, tmp_path, hang)
    failing = sum(1 for record in records if record.get("fail"))
    flow = rq_flow(
        write_jsonl(records, tmp_path / "orders.jsonl"),
        # SimpleWorker's jobs hold RQ's started registry for job_timeout + 60 s: keep it short.
        dispatch=RqDispatch(retries=retries, job_timeout=20),
        max_failed_jobs=0.05,
    )
    defs = make_defs([flow], redis_url, database_url)
    store = Ledger(url=database_url)
    env = {"FLOW_DATABASE_URL": database_url, "FLOW_TEST_HANDLED": str(handled)}

    with rq_workers(2, FLOW, redis_url, env, tmp_path, worker_class) as workers:
        result = run_flow(defs, FLOW, instance)
        assert result.success  # the Dagster run ends when dispatch ends
        run_id = result.run_id
        row = row_of(database_url, run_id)
        assert (row.flow_status, row.extraction_done, row.dispatched_jobs) == ("running", True, 0)

        wait_for(hang.exists, 300, "a worker to start the hanging job")
        killed = workers.kill_holder_of(int(hang.read_text()))
        assert workers.alive() == [index != killed for index in range(2)]

        def settled() -> bool:
            return store.page_totals([run_id])[run_id].counts.pending == 0

        wait_for(settled, 600, f"every job acked; worker logs:\n{workers.tail()}")

    connection = redis.Redis.from_url(redis_url)
    try:
        finished = Job.fetch(f"{FLOW}-{run_id}-p0-j0", connection=connection, serializer=SERIALIZER)
        assert ack_success(finished, connection, finished.return_value()) is Outcome.NOOP
        failed_jobs = FailedJobRegistry(FLOW, connection=connection).get_job_ids()
    finally:
        connection.close()

    tick(defs, instance)
    row = row_of(database_url, run_id)
    failed = failing + lost
    expected = Counts(
        jobs + 50, jobs, skipped=30, rejected=20, completed=jobs - failed, failed=failed
    )
    assert_counts(row, expected)
    assert_conserved(row)
    assert row.flow_status == "partial_success"
    assert row.counter_mismatch is None
    assert run_keys_left(redis_url) == []
    hung_key = next(r["id"] for r in records if r.get("hang"))
    errors = {f.record_key: f.error for f in store.job_failures(row.run_id, limit=1000)}
    if lost:
        assert errors[hung_key] == LOST_ERROR
        assert len(failed_jobs) == 1
    else:
        assert hung_key not in errors
        assert hung_key in handled.read_text().split()


def test_flowctl_run_waits_for_the_workers_then_finalizes(
    redis_url: str,
    sqlite_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``flowctl run`` of a dispatch="rq" flow (runner.run_flow with ``wait_seconds``) returns
    the final row once a real worker has acked every job, not the ``running`` row."""
    monkeypatch.setenv("FLOW_DATABASE_URL", sqlite_url)
    records = [{"id": f"o{n}", "fail": n % 10 == 3} for n in range(200)] + [{"id": "o1"}]
    flow = rq_flow(
        write_jsonl(records, tmp_path / "orders.jsonl"),
        dispatch=RqDispatch(batch_size=20),
        max_failed_jobs=0.2,
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    env = {"FLOW_DATABASE_URL": sqlite_url}
    with rq_workers(1, FLOW, redis_url, env, tmp_path, "rq.worker.SimpleWorker"):
        row = runner.run_flow(defs, FLOW, instance=instance, wait_seconds=120)

    assert row.flow_status == "partial_success", row.failure_reason
    assert_counts(row, Counts(201, 200, skipped=1, completed=180, failed=20))
    assert run_keys_left(redis_url) == []


def _ack_from_another_process(
    redis_url: str, acks: dict[str, dict[str, Any]], ready: str, gate: str, rounds: int
) -> list[tuple[str, str]]:
    """In a spawned process: say ready, wait at the gate, then send every success callback
    ``rounds`` times (redelivery); what each ack did."""
    connection = redis.Redis.from_url(redis_url)
    Path(ready).touch()
    while not os.path.exists(gate):
        time.sleep(0.001)
    done = []
    for _ in range(rounds):
        for job_id, outcome in acks.items():
            job = Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
            done.append((job_id, ack_success(job, connection, outcome).value))
    return done


def test_the_same_acks_sent_concurrently_from_two_processes_count_once(
    started: tuple[Flow, str, LiveCounters, Ledger], redis_url: str, tmp_path: Path
) -> None:
    """Two processes deliver every job's success callback three times each, at once: each
    job's outcome is applied exactly once (one DONE or ZERO per job, the rest NOOP),
    the last one applied says ZERO, and the ledger and Redis agree on exact totals."""
    flow, run_id, counters, store = started
    page = Page(0, [{"id": f"k{n}"} for n in range(40)])
    process_page(flow, run_id, page, counters, store)
    jobs = queued_jobs(counters, "rq_orders")
    acks = {
        job.id: {"completed": job.args[4][:1], "failed": {key: "no" for key in job.args[4][1:]}}
        for job in jobs
    }
    gate, ready = tmp_path / "go", [tmp_path / f"ready{n}" for n in range(2)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_ack_from_another_process, redis_url, acks, str(flag), str(gate), 3)
            for flag in ready
        ]
        wait_for(lambda: all(flag.exists() for flag in ready), 120, "both processes ready")
        gate.touch()  # both wait at the gate: their acks overlap
        done = [ack for future in futures for ack in future.result(timeout=120)]

    applied = Counter(job_id for job_id, outcome in done if outcome in ("DONE", "ZERO"))
    assert applied == dict.fromkeys(acks, 1)
    assert sum(outcome == "ZERO" for _, outcome in done) == 1
    assert len(done) == 2 * 3 * len(acks)
    expected = Counts(source=40, dispatched=40, completed=20, failed=20)
    assert store.page_totals([run_id])[run_id].counts == expected
    assert counters.totals(FLOW, run_id) == expected
