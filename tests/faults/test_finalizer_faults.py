"""Finalizer faults, for real: Dagster runs (instance_for_test, execute_in_process), real
sensor ticks and finalize_runs calls, real Redis, real PostgreSQL and SQLite. The faults are
real too: a PostgreSQL server stopped before or during a tick, finalizers racing in threads
and in processes, a failing handler, a run terminated the way Dagster terminates one
(CANCELING, then SIGINT), a run process killed with SIGKILL. Nothing is faked. Two hooks
place faults precisely: a logging handler stops PostgreSQL at a chosen point of a tick, and
a lock held by the test on the ledger makes racing finalizers meet at the final write."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
import redis
import sqlalchemy

from devservers import PostgresServer
from flow_assets.build import build_definitions
from flow_assets.cli.runner import QUIET_RUN_CONFIG
from flow_assets.dagster_names import COUNTERS_KEY, STORE_KEY
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow, Handler
from flow_assets.sources import FileSource
from resources.counts import Counts
from resources.errors import StoreUnavailableError
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.ledger.records import RunRow
from resources.live.counters import LiveCounters
from resources.live.redis_counters import RedisCounters
from sensors.finalizer import FinalizeReport, FlowPolicy, finalize_runs
from tests.flowkit import (
    assert_conserved,
    assert_counts,
    make_defs,
    row_of,
    run_flow,
    run_keys_left,
    status_tag,
    tick,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE_SIZE = 5
PASSWORD = "pw-Sup3rSecret"
SUBPROCESS_TIMEOUT_S = 180.0  # imports and a Dagster run on a busy 2-core machine
RACE_RUNS = 12
STALL_DEADLINE = timedelta(minutes=5)


def write_records(path: Path, ids: Sequence[int]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "value": i * 10}) + "\n" for i in ids))
    return path


def file_flow(name: str, path: Path, handler: Handler = lambda batch: None, **options) -> Flow:
    """A flow over a JSONL file, one page per step so a fault hits exactly one page."""
    return Flow(
        name=name,
        source=FileSource(path, page_size=PAGE_SIZE),
        key="id",
        handler=handler,
        pages_per_step=1,
        **options,
    )


def policies(*flows: Flow) -> dict[str, FlowPolicy]:
    return {f.name: FlowPolicy(tolerance=f.tolerance, deadline=f.deadline) for f in flows}


def assert_final(row: RunRow, status: str, expected: Counts) -> None:
    assert row.flow_status == status, row
    assert_counts(row, expected)
    assert_conserved(row)
    assert row.finished_at is not None


def run_status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None, f"Dagster has no run {run_id}"
    return run.status


def materializations_per_run(instance: dg.DagsterInstance, flow_name: str) -> Counter[str]:
    records = instance.fetch_materializations(dg.AssetKey(["flows", flow_name]), limit=1000)
    return Counter(
        str(r.asset_materialization.metadata["dagster_run"].value)
        for r in records.records
        if r.asset_materialization is not None
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def python_subprocess(log: Path, call: str, *args: str) -> subprocess.Popen[str]:
    """Run ``call(*argv)`` from this module in a fresh interpreter (same DAGSTER_HOME); its
    output goes to ``log`` (a pipe nobody reads could fill up and stall it)."""
    code = f"import sys; from {__name__} import {call}; {call}(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finish(proc: subprocess.Popen[str], log: Path) -> tuple[int, str]:
    """Wait (bounded) for ``proc``; its exit code and the end of its output."""
    try:
        proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode, log.read_text(errors="replace")[-3000:]


# --------------------------------------------------------------- 1. PostgreSQL stops


def with_password(postgres_url: str) -> tuple[str, str]:
    """The test database URL with a password (trust auth ignores it), and its redacted form."""
    assert "://postgres@" in postgres_url
    return (
        postgres_url.replace("://postgres@", f"://postgres:{PASSWORD}@"),
        postgres_url.replace("://postgres@", "://postgres:***@"),
    )


def secret_defs(flows: list[Flow], redis_url: str, secret_url: str) -> dg.Definitions:
    """Definitions whose store URL has a password and gives up connecting after 0.5 s."""
    store = MetricsStore(url=secret_url, connect_retry_seconds=0.5)
    return build_definitions(
        flows, resources={STORE_KEY: store, COUNTERS_KEY: RedisCounters(url=redis_url)}
    )


def test_a_tick_with_postgres_down_fails_clearly_and_the_next_tick_finalizes(
    postgres_server: PostgresServer,
    postgres_url: str,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_url, redacted = with_password(postgres_url)
    flow = file_flow("pg_down", write_records(tmp_path / "d.jsonl", range(12)))
    defs = secret_defs([flow], redis_url, secret_url)
    result = run_flow(defs, flow.name, instance)
    assert result.success
    keys_before = run_keys_left(redis_url)

    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailableError) as failure:
            tick(defs, instance)
    finally:
        postgres_server.start()

    message = str(failure.value)
    assert redacted in message
    assert "database server is running" in message
    assert PASSWORD not in message and PASSWORD not in caplog.text
    row = row_of(postgres_url, result.run_id)
    assert row.flow_status == "running" and row.finished_at is None
    assert status_tag(instance, result.run_id) is None
    assert materializations_per_run(instance, flow.name) == Counter()
    assert run_keys_left(redis_url) == keys_before != []

    tick(defs, instance)
    assert_final(row_of(postgres_url, result.run_id), "completed", Counts(12, 12, 0, 0, 12, 0))
    assert status_tag(instance, result.run_id) == "completed"
    assert run_keys_left(redis_url) == []


class StopPostgresOnLog(logging.Handler):
    """Stops PostgreSQL when the finalizer logs about ``run_id``: after the tick has read
    the ledger and decided, just before it writes the final rows."""

    def __init__(self, server: PostgresServer, run_id: str) -> None:
        super().__init__(level=logging.WARNING)
        self.server, self.run_id, self.fired = server, run_id, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and self.run_id in record.getMessage():
            self.fired = True
            self.server.stop()


def test_postgres_stopping_mid_tick_finalizes_nothing_wrongly(
    postgres_server: PostgresServer,
    postgres_url: str,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    data = tmp_path / "d.jsonl"
    flow = file_flow("pg_mid_tick", data)
    secret_url, redacted = with_password(postgres_url)
    defs = secret_defs([flow], redis_url, secret_url)
    write_records(data, [*range(10), 3, 7])  # run A: two duplicates
    run_a = run_flow(defs, flow.name, instance).run_id
    write_records(data, range(8))  # run B
    run_b = run_flow(defs, flow.name, instance).run_id
    # Redis loses run B's keys, so the finalizer logs a counter mismatch for B right before
    # writing B's final row: that log line is where PostgreSQL goes down.
    LiveCounters(url=redis_url).delete_run(flow.name, run_b)
    hook = StopPostgresOnLog(postgres_server, run_b)
    logger = logging.getLogger("sensors.finalizer")
    logger.addHandler(hook)
    try:
        with pytest.raises(StoreUnavailableError, match=r"cannot connect") as failure:
            tick(defs, instance)
    finally:
        logger.removeHandler(hook)
        postgres_server.start()
    assert hook.fired
    assert redacted in str(failure.value) and PASSWORD not in str(failure.value)

    # A tick's final rows are one transaction, written after the Redis comparison: the
    # outage leaves both runs running, nothing half-written and nothing published.
    for row in (row_of(postgres_url, run_a), row_of(postgres_url, run_b)):
        assert row.flow_status == "running" and row.finished_at is None
        assert row.published_at is None
    assert status_tag(instance, run_a) is None and status_tag(instance, run_b) is None
    assert materializations_per_run(instance, flow.name) == Counter()

    tick(defs, instance)
    row_a, row_b = row_of(postgres_url, run_a), row_of(postgres_url, run_b)
    assert_final(row_a, "partial_success", Counts(12, 10, 2, 0, 10, 0))
    assert_final(row_b, "completed", Counts(8, 8, 0, 0, 8, 0))
    assert row_a.counter_mismatch is None
    assert "Redis had lost" in (row_b.counter_mismatch or "")
    assert status_tag(instance, run_a) == "partial_success"
    assert status_tag(instance, run_b) == "completed"
    assert materializations_per_run(instance, flow.name) == Counter({run_a: 1, run_b: 1})
    assert run_keys_left(redis_url) == []


# --------------------------------------------------------------- 2. racing finalizers


def race_expectation(i: int) -> tuple[list[dict[str, object]], str, Counts]:
    """Run ``i`` of a race: its source records, expected status and counts (ground truth)."""
    unique = 4 + i % 5
    failed = 1 if i % 4 == 1 else 0
    records: list[dict[str, object]] = [
        {"id": k, "fail": k == 1 and failed == 1} for k in range(unique)
    ]
    records += [{"id": 0, "fail": False}] if i % 3 == 0 else []  # a duplicate
    skipped = len(records) - unique
    status = "failed" if failed else "partial_success" if skipped else "completed"
    return records, status, Counts(len(records), unique, skipped, 0, unique - failed, failed)


RACE_POLICIES = {"race": FlowPolicy()}  # the race flow's defaults: no failure tolerated


def race_flow(path: Path) -> Flow:
    def handler(batch: JobBatch) -> None:
        for key, record in batch.items():
            if record["fail"]:
                batch.fail(key, ValueError("rejected by the downstream service"))

    return Flow(
        name="race", source=FileSource(path, page_size=PAGE_SIZE), key="id", handler=handler
    )


def prepare_race(
    tmp_path: Path, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> dict[str, tuple[str, Counts]]:
    """RACE_RUNS finished, unfinalized runs: run id -> expected (status, counts)."""
    data = tmp_path / "race.jsonl"
    defs = make_defs([race_flow(data)], redis_url, database_url)
    expected = {}
    for i in range(RACE_RUNS):
        records, status, counts = race_expectation(i)
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
        result = run_flow(defs, "race", instance, run_config=QUIET_RUN_CONFIG)
        expected[result.run_id] = (status, counts)
    return expected


def race_from_subprocess(database_url: str, redis_url: str, ready: str, out: str) -> None:
    """Subprocess entry: connect everything, signal ready, wait for a line on stdin (go),
    finalize once, write the report."""
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    with dg.DagsterInstance.get() as instance:  # DAGSTER_HOME: the test's instance
        instance.get_runs(limit=1)
        store.running_runs(1)
        counters.stray_runs()
        Path(ready).touch()
        sys.stdin.readline()
        report = finalize_runs(instance, store, counters, RACE_POLICIES)
    Path(out).write_text(json.dumps({"finalized": report.finalized}))


def live_totals_reads(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


@contextmanager
def ledger_write_lock(database_url: str) -> Iterator[Callable[[], None]]:
    """Hold the ledger's write lock (PostgreSQL: every flow_metrics row; SQLite: the
    database); yields the function that releases it."""
    url = sqlalchemy.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        raw = sqlite3.connect(str(url.database), isolation_level=None, timeout=30)
        try:
            raw.execute("BEGIN IMMEDIATE")
            yield raw.commit
        finally:
            raw.close()
        return
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            held = conn.begin()
            conn.execute(sqlalchemy.text("SELECT run_id FROM flow_metrics FOR UPDATE"))
            yield held.commit
    finally:
        engine.dispose()


@contextmanager
def final_writes_held(database_url: str, redis_url: str) -> Iterator[Callable[[int], None]]:
    """Make racers meet at the compare-and-set. With the ledger's write lock held, each
    racer reads all runs as running, reads the first run's live totals from Redis (HGETALL,
    counted by the server) and blocks on its first final write. The yielded function waits
    (bounded) until ``n`` racers got there, then releases them all at once."""
    client = redis.Redis.from_url(redis_url)
    try:
        with ledger_write_lock(database_url) as unlock:
            before = live_totals_reads(client)

            def release(n: int) -> None:
                def arrived() -> bool:
                    return live_totals_reads(client) - before >= n

                wait_for(arrived, f"{n} finalizers to reach their first final write", 120)
                unlock()

            yield release
    finally:
        client.close()


@dataclass
class RacerProcess:
    """A finalizer in a process of its own (see ``race_from_subprocess``)."""

    proc: subprocess.Popen[str]
    ready: Path
    out: Path
    log: Path

    @classmethod
    def start(cls, n: int, database_url: str, redis_url: str, tmp_path: Path) -> RacerProcess:
        ready, out, log = (tmp_path / f"racer{n}.{ext}" for ext in ("ready", "json", "log"))
        args = (database_url, redis_url, str(ready), str(out))
        return cls(python_subprocess(log, "race_from_subprocess", *args), ready, out, log)

    def started(self) -> bool:
        return self.ready.exists() or self.proc.poll() is not None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def report(self) -> FinalizeReport:
        code, output = finish(self.proc, self.log)
        assert code == 0, output
        return FinalizeReport(finalized=json.loads(self.out.read_text())["finalized"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_finalizers_racing_in_two_threads_and_two_processes_write_each_run_once(
    redis_url: str, database_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    store.running_runs(1)  # creates the schema before the racer processes look at it
    # Started first, so that they import while the runs execute.
    processes = [RacerProcess.start(n, database_url, redis_url, tmp_path) for n in range(2)]
    go = threading.Event()
    reports: list[FinalizeReport] = []
    errors: list[BaseException] = []

    def racer() -> None:
        try:
            if go.wait(timeout=SUBPROCESS_TIMEOUT_S):
                reports.append(finalize_runs(instance, store, counters, RACE_POLICIES))
        except BaseException as exc:  # asserted on in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(2)]
    try:
        expected = prepare_race(tmp_path, redis_url, database_url, instance)
        for process in processes:
            wait_for(process.started, "a racer process to start", SUBPROCESS_TIMEOUT_S)
        with final_writes_held(database_url, redis_url) as release:
            for thread in threads:
                thread.start()
            for process in processes:
                process.go()
            go.set()
            release(4)
        for thread in threads:
            thread.join(timeout=SUBPROCESS_TIMEOUT_S)
        reports += [process.report() for process in processes]
    finally:
        go.set()  # no racer is left waiting when something above failed
        for process in processes:
            process.stop()
    assert not any(thread.is_alive() for thread in threads) and errors == []
    assert len(reports) == 4

    # finalize() returned True exactly once per run across the four racers.
    wins = Counter(run_id for report in reports for run_id in report.finalized)
    assert wins == Counter(dict.fromkeys(expected, 1))
    for report in reports:
        assert all(status == expected[run_id][0] for run_id, status in report.finalized.items())
    published = materializations_per_run(instance, "race")
    for run_id, (status, counts) in expected.items():
        row = row_of(database_url, run_id)
        assert_final(row, status, counts)
        assert row.published_at is not None
        assert status_tag(instance, run_id) == status
        # Publishing is at-least-once (sensors/publish.py): a racer that listed the run as
        # unpublished before another marked it published reports it again.
        assert 1 <= published[run_id] <= len(reports)
    assert run_keys_left(redis_url) == []
    again = finalize_runs(instance, store, counters, RACE_POLICIES)
    assert again.finalized == {} and again.published == []


# ----------------------------------------------- 3. failed, cancelled and stalled runs


@pytest.mark.parametrize(
    ("mode", "database"),
    [("non_retryable", "postgres_url"), ("retries_exhausted", "sqlite_url")],
)
def test_a_failed_dagster_run_gives_failed_with_the_step_error_and_the_lost_jobs(
    mode: str,
    database: str,
    request: pytest.FixtureRequest,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    database_url = str(request.getfixturevalue(database))
    secret = f"postgresql://svc:{PASSWORD}@orders-db.internal/orders"

    def handler(batch: JobBatch) -> None:
        if "7" not in batch.keys:
            return
        for key in batch.keys[:2]:
            batch.complete(key)  # work done, but the page never records it: lost
        if mode == "non_retryable":
            raise dg.Failure(f"orders service refused the page ({secret})", allow_retries=False)
        raise ConnectionError(f"orders service unreachable at {secret}")

    flow = file_flow(
        "failing",
        write_records(tmp_path / "d.jsonl", range(15)),
        handler,
        retry_policy=dg.RetryPolicy(max_retries=1),
    )
    defs = make_defs([flow], redis_url, database_url)
    result = run_flow(defs, flow.name, instance)
    assert not result.success
    retries = result.filter_events(lambda e: e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retries) == (0 if mode == "non_retryable" else 1)
    tick(defs, instance)

    row = row_of(database_url, result.run_id)
    reason = row.failure_reason or ""
    if mode == "non_retryable":
        # Pages 0 and 2 done (10 jobs); page 1 dispatched its 5 jobs and never finished
        # them: lost, counted failed on the final row.
        assert_final(row, "failed", Counts(15, 15, 0, 0, 10, 5))
        # Every page has its row: extraction is complete (issue 10 item 9d).
        assert reason.startswith("Dagster run failed; 5 jobs lost: ")
    else:
        # The last attempt kept what the handler reported (2 completed) and failed the rest
        # with the handler's error.
        assert_final(row, "failed", Counts(15, 15, 0, 0, 12, 3))
        assert reason.startswith("Dagster run failed: ")
        errors = {f.error for f in Ledger(url=database_url).job_failures(result.run_id)}
        assert errors == {
            "ConnectionError: orders service unreachable at " + secret.replace(PASSWORD, "***")
        }
    assert "failing_pages[pages_1_1]" in reason
    assert ("refused the page" if mode == "non_retryable" else "ConnectionError") in reason
    assert "svc:***@orders-db.internal" in reason and PASSWORD not in reason
    assert status_tag(instance, result.run_id) == "failed"
    assert run_keys_left(redis_url) == []


def test_a_terminated_dagster_run_gives_cancelled_with_the_lost_jobs(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    def handler(batch: JobBatch) -> None:
        if "5" in batch.keys:
            # What Dagster's terminate does: mark the run CANCELING, then interrupt it.
            started = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
            instance.report_run_canceling(instance.get_runs(started, limit=1)[0])
            os.kill(os.getpid(), signal.SIGINT)  # raised here by Dagster's interrupt handler

    flow = file_flow(
        "terminated",
        write_records(tmp_path / "d.jsonl", range(15)),
        handler,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, flow.name, instance)
    assert run_status(instance, result.run_id) == dg.DagsterRunStatus.CANCELED
    tick(defs, instance)

    row = row_of(sqlite_url, result.run_id)
    assert_final(row, "cancelled", Counts(15, 15, 0, 0, 10, 5))
    # The in-process executor still ran the last page after the interrupt: every page has
    # its row, so extraction is complete; only the interrupted page's jobs are lost.
    assert row.failure_reason == "run cancelled; 5 jobs lost"
    assert status_tag(instance, result.run_id) == "cancelled"
    assert run_keys_left(redis_url) == []


def stalling_flow(path: Path, handler: Handler = lambda batch: None) -> Flow:
    return file_flow("stalling", path, handler, deadline=STALL_DEADLINE)


def run_until_killed(data_path: str, redis_url: str, database_url: str) -> None:
    """Subprocess entry: run the stalling flow; the second page's handler SIGKILLs this
    process, so the Dagster run stays STARTED and that page's jobs stay pending."""
    pages: list[list[str]] = []

    def handler(batch: JobBatch) -> None:
        pages.append(batch.keys)
        if len(pages) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    flow = stalling_flow(Path(data_path), handler)
    with dg.DagsterInstance.get() as instance:
        run_flow(make_defs([flow], redis_url, database_url), flow.name, instance)
    raise SystemExit("the handler should have killed this process")


def test_a_run_with_no_progress_past_its_deadline_gives_failed_stalled(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    data = write_records(tmp_path / "d.jsonl", range(15))
    log = tmp_path / "killed.log"
    proc = python_subprocess(log, "run_until_killed", str(data), redis_url, sqlite_url)
    code, output = finish(proc, log)
    assert code == -signal.SIGKILL, output
    [run] = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.STARTED  # nobody is left to say it ended
    assert run_keys_left(redis_url) != []
    store, counters = Ledger(url=sqlite_url), LiveCounters(url=redis_url)
    flow_policies = policies(stalling_flow(data))
    now = datetime.now(timezone.utc)

    for elapsed in (timedelta(0), STALL_DEADLINE - timedelta(minutes=1)):
        report = finalize_runs(instance, store, counters, flow_policies, now=now + elapsed)
        assert report.finalized == {} and run.run_id in report.waiting
    assert row_of(sqlite_url, run.run_id).flow_status == "running"

    later = now + STALL_DEADLINE + timedelta(minutes=1)
    report = finalize_runs(instance, store, counters, flow_policies, now=later)
    assert report.finalized == {run.run_id: "failed"}
    row = row_of(sqlite_url, run.run_id)
    assert_final(row, "failed", Counts(10, 10, 0, 0, 5, 5))
    assert row.failure_reason == (
        "stalled: no progress past the deadline; extraction incomplete: page 2 of 3 never"
        " ran; re-execute all steps of the run (a re-execution from failure cannot reach"
        " them); 5 jobs lost"
    )
    assert status_tag(instance, run.run_id) == "failed"
    assert run_keys_left(redis_url) == []


# ------------------------------------------------------------------ bugs found here


def test_two_runs_of_one_partition_are_both_published(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    write_records(tmp_path / "p1.jsonl", range(6))
    flow = Flow(
        name="partitioned",
        source=FileSource(tmp_path / "{partition}.jsonl", page_size=PAGE_SIZE),
        key="id",
        handler=lambda batch: None,
        partitions=dg.StaticPartitionsDefinition(["p1"]),
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    first = run_flow(defs, flow.name, instance, partition_key="p1").run_id
    tick(defs, instance)
    second = run_flow(defs, flow.name, instance, partition_key="p1").run_id  # a re-run
    tick(defs, instance)
    for run_id in (first, second):
        assert_final(row_of(sqlite_url, run_id), "completed", Counts(6, 6, 0, 0, 6, 0))
        assert status_tag(instance, run_id) == "completed"
    assert run_keys_left(redis_url) == []


def test_a_run_failed_mid_page_with_redis_intact_notes_no_counter_mismatch(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    def handler(batch: JobBatch) -> None:
        if "7" in batch.keys:
            raise dg.Failure("downstream down", allow_retries=False)

    flow = file_flow("lossy", write_records(tmp_path / "d.jsonl", range(15)), handler)
    defs = make_defs([flow], redis_url, sqlite_url)
    run_id = run_flow(defs, flow.name, instance).run_id
    tick(defs, instance)
    row = row_of(sqlite_url, run_id)
    assert_final(row, "failed", Counts(15, 15, 0, 0, 10, 5))  # 5 lost
    assert row.counter_mismatch is None
