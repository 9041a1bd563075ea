"""Page-level faults injected into real Dagster runs, on real Redis and real PostgreSQL/SQLite:
a handler raising halfway through a page, a step process killed with SIGKILL, Redis losing
the run's keys (FLUSHALL, a restart without persistence), SCRIPT FLUSH, PostgreSQL stopped
mid-step. Nothing is faked: the faults are injected from the flow's own handler (or source)
at a chosen page, and each run ends, after a real finalizer tick, with the flow_metrics row
equal to the ground truth computed from the test's own records."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import redis

from devservers import PostgresServer, RedisServer
from flow_assets.build import build_definitions
from flow_assets.dagster_names import COUNTERS_KEY, ROOT_RUN_ID_TAG, STORE_KEY
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.page_step import LOST_MID_RUN
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.ledger.records import RunRow
from resources.live import lua_pages
from resources.live.counters import LiveCounters
from resources.live.redis_counters import RedisCounters
from tests.faults import fault_flows
from tests.faults.fault_flows import (
    MAX_FAILED_JOBS,
    ListSource,
    ground_truth,
    ledger_totals,
    orders,
    page_of,
    running_run_id,
    settle,
)
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
FLOW = "page_faults"
RECORDS = 600
PAGE = 40  # 15 pages
PAGES_PER_STEP = 3  # chunks [0-2] [3-5] [6-8] [9-11] [12-14]
REDIS_LOST_AT_FINALIZE = "Redis had lost the run's counters"
PASSWORD = "s3cret-pw-9f41"
# Set with ROOT_RUN_ID_TAG by Dagster's UI launcher on every re-execution.
PARENT_RUN_ID_TAG = "dagster/parent_run_id"


def make_flow(
    handler: Callable[[JobBatch], None],
    records: Sequence[Mapping[str, Any]],
    on_fetch: Callable[[int], None] | None = None,
) -> Flow:
    return Flow(
        name=FLOW,
        source=ListSource(records, PAGE, on_fetch),
        key="id",
        handler=handler,
        pages_per_step=PAGES_PER_STEP,
        max_failed_jobs=MAX_FAILED_JOBS,
        retry_policy=dg.RetryPolicy(max_retries=2),
    )


def retry_events(result: dg.ExecuteInProcessResult) -> list[dg.DagsterEvent]:
    return result.filter_events(lambda e: e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)


class WrongFinalStatus(AssertionError):
    """The final row has the right counts but the wrong status."""


def assert_final(row: RunRow, truth: Counts) -> None:
    """Exact counts, conservation, every page done; then the status they imply."""
    assert_counts(row, truth)
    assert_conserved(row)
    assert row.pages_done == row.pages_total
    if row.flow_status != "partial_success":
        raise WrongFinalStatus(f"{row.flow_status}: {row.failure_reason}")


def test_ground_truth_data_is_not_trivial() -> None:
    truth = ground_truth(orders(RECORDS, PAGE))
    assert truth.source == RECORDS
    assert truth.skipped > 0 and truth.rejected > 0 and truth.failed > 0
    assert truth.conservation_errors() == []


# ------------------------------------------------------- 1. a page step fails, then retries


def test_pages_failing_halfway_are_retried_and_pages_recorded_before_count_once(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    """Pages 4 and 10 (the middle pages of their chunks) raise after settling half their
    jobs, on the first attempt only. Their whole chunk was pre-written 'dispatched' before
    its first handler ran; the retry records every page of it again, once, in the ledger and
    in Redis. (What a failed attempt records of the pages before the failing one:
    tests/services/test_page_step.py.)"""
    records = orders(RECORDS, PAGE)
    truth = ground_truth(records)
    store = Ledger(url=database_url)
    failing = (4, 10)
    attempts: Counter[int] = Counter()
    ledger_at_failure: dict[int, dict[int, Counts]] = {}

    def handler(batch: JobBatch) -> None:
        page = page_of(batch, PAGE)
        attempts[page] += 1
        half = len(batch.records) // 2
        settle(batch, batch.records[:half])
        if page in failing and attempts[page] == 1:
            ledger_at_failure[page] = store.page_counts(running_run_id(store, FLOW))
            raise RuntimeError(f"injected: downstream went away halfway through page {page}")

        settle(batch, batch.records[half:])

    defs = make_defs([make_flow(handler, records)], redis_url, database_url)
    result = run_flow(defs, FLOW, instance)

    assert result.success
    assert len(retry_events(result)) == len(failing)
    final_pages = store.page_counts(result.run_id)
    for page in failing:
        chunk = range(page - 1, page + 2)  # the failing page is the middle one
        before = ledger_at_failure[page]
        for other in chunk:  # pre-written 'dispatched' with the counts it ends with
            assert before[other] == replace(final_pages[other], completed=0, failed=0)
            assert before[other].pending == before[other].dispatched > 0
        assert attempts[page - 1] == attempts[page] == 2  # the chunk's pages ran again
    assert {p: n for p, n in attempts.items() if n != 1} == {3: 2, 4: 2, 9: 2, 10: 2}
    live = LiveCounters(url=redis_url).totals(FLOW, result.run_id)
    assert live == ledger_totals(store, result.run_id) == truth  # Redis counted pages once

    tick(defs, instance)
    row = row_of(database_url, result.run_id)
    assert_final(row, truth)
    assert row.counter_mismatch is None
    assert run_keys_left(redis_url) == []


# ------------------------------------------------- 2. SIGKILL mid-page, re-execute from failure

CRASH_PAGE = 5  # the second page of the chunk [4-7]
MP_RECORDS = 400  # 8 pages of 50: 2 chunk steps, run side by side
MULTIPROCESS = {
    "execution": {
        "config": {"multiprocess": {"start_method": {"forkserver": {}}, "max_concurrent": 2}}
    }
}
# A step process costs seconds on a loaded machine: some re-executions run in-process.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


@pytest.mark.parametrize(
    ("ledger", "tick_between", "ui_tags", "rerun_config"),
    [
        pytest.param("sqlite", False, True, IN_PROCESS, id="sqlite"),
        pytest.param("postgres", True, True, MULTIPROCESS, id="postgres-tick-between"),
        pytest.param(
            "sqlite",
            False,
            False,
            IN_PROCESS,
            id="python-api-reexecution",
        ),
    ],
)
def test_a_sigkilled_page_step_is_reexecuted_from_failure_and_counted_once(
    ledger: str,
    tick_between: bool,
    ui_tags: bool,
    rerun_config: dict[str, Any],
    request: pytest.FixtureRequest,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    """The step process handling page 5 kills itself with SIGKILL halfway through the page
    (multiprocess executor, no Dagster retry): the run fails with the page's jobs pending.
    Re-executed from failure, the flow run (identity: the root run id) ends with exact counts.
    With a tick in between, the run is first finalized ``failed`` (work lost), then reopened
    by the re-execution and finalized again. ``ui_tags``: the re-execution carries the
    parent/root run tags that Dagster's UI launcher gives it."""
    database_url = str(request.getfixturevalue(f"{ledger}_url"))
    records = orders(MP_RECORDS, fault_flows.PAGE_SIZE, quiet_pages={CRASH_PAGE})
    truth = ground_truth(records)
    data, marker = tmp_path / "orders.jsonl", tmp_path / "crashed.pid"
    fault_flows.write_jsonl(records, data)
    kwargs: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_path": str(data),
        "marker_path": str(marker),
        "crash_page": CRASH_PAGE,
    }
    job = dg.build_reconstructable_job(
        "tests.faults.fault_flows",
        "build_job",
        reconstructable_kwargs=kwargs,
        reconstructor_working_directory=str(REPO_ROOT),
    )
    defs = fault_flows.build_definitions(**kwargs)
    store = Ledger(url=database_url)

    with dg.execute_job(job, instance=instance, run_config=MULTIPROCESS) as crashed:
        assert not crashed.success
        root = crashed.run_id
    assert int(marker.read_text()) != os.getpid()  # the handler died in a step process
    assert instance.get_run_by_id(root).status == dg.DagsterRunStatus.FAILURE
    quiet = fault_flows.PAGE_SIZE  # a quiet page: every record is a job of its own
    pages = store.page_counts(root)
    assert pages[CRASH_PAGE] == Counts(source=quiet, dispatched=quiet)
    # The step pre-wrote its whole chunk [4-7] and recorded none of it: all of it is pending.
    assert all(pages[p].pending == pages[p].dispatched for p in range(4, 8))
    lost = sum(counts.pending for counts in pages.values())
    assert lost == sum(pages[p].dispatched for p in range(4, 8))  # other steps finished
    assert row_of(database_url, root).flow_status == "running"

    if tick_between:
        tick(defs, instance)
        row = row_of(database_url, root)
        assert row.flow_status == "failed"
        assert row.failure_reason is not None
        assert "Dagster run failed" in row.failure_reason
        assert f"{lost} jobs lost" in row.failure_reason
        assert_conserved(row)
        assert status_tag(instance, root) == "failed"
        assert run_keys_left(redis_url) == []

    tags = {PARENT_RUN_ID_TAG: root, ROOT_RUN_ID_TAG: root} if ui_tags else None
    with dg.execute_job(
        job,
        instance=instance,
        run_config=rerun_config,
        tags=tags,
        reexecution_options=dg.ReexecutionOptions.from_failure(root, instance),
    ) as rerun:
        assert rerun.success
        assert rerun.dagster_run.root_run_id == root
        rerun_steps = {
            event.step_key
            for event in rerun.all_events
            if event.event_type == dg.DagsterEventType.STEP_SUCCESS
        }
    flow = fault_flows.FLOW_NAME
    assert rerun_steps == {f"{flow}_pages[pages_4_7]", f"{flow}_collect"}
    assert ledger_totals(store, root) == truth  # the crashed page was settled, once
    assert store.runs(run_id=rerun.run_id) == []  # the re-execution continued the root's run

    tick(defs, instance)
    row = row_of(database_url, root)
    assert row.pages_total == MP_RECORDS // fault_flows.PAGE_SIZE
    assert run_keys_left(redis_url) == []
    assert_final(row, truth)
    assert status_tag(instance, root) == "partial_success"


# ------------------------------------------------------------ 3. Redis loses the run's keys

LOSS_PAGE = 5  # the last page of the chunk [3-5]
CHECK_PAGE = 7  # a later page, in the next chunk


def flushall(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("loss", "where"),
    [("flushall", "handler"), ("restart", "handler"), ("flushall", "between_pages")],
)
def test_redis_losing_the_run_mid_run_and_before_finalization(
    loss: str,
    where: str,
    redis_server: RedisServer,
    redis_url: str,
    database_url: str,
    instance: dg.DagsterInstance,
) -> None:
    """Redis loses the run's keys inside the handler of page 5 (detected when the page is
    recorded) or just before page 5 is read (detected when it is claimed); the live counters
    are rebuilt from the ledger, duplicates of keys claimed before the loss are still
    skipped, and the loss is noted on the run. Redis is flushed again after the run: the
    final row is computed from the SQL ledger and both losses are recorded."""
    records = orders(RECORDS, PAGE)
    truth = ground_truth(records)
    store = Ledger(url=database_url)
    counters = LiveCounters(url=redis_url)
    live_after_loss: list[Counts | None] = []
    live_vs_ledger: list[tuple[Counts | None, Counts]] = []

    def lose_keys() -> None:
        run_id = running_run_id(store, FLOW)
        assert counters.totals(FLOW, run_id) is not None
        if loss == "flushall":
            flushall(redis_url)
        else:
            redis_server.restart()  # no persistence: the new server is empty
        live_after_loss.append(counters.totals(FLOW, run_id))

    def on_fetch(index: int) -> None:
        if where == "between_pages" and index == LOSS_PAGE:
            lose_keys()

    def handler(batch: JobBatch) -> None:
        page = page_of(batch, PAGE)
        settle(batch, batch.records)
        if where == "handler" and page == LOSS_PAGE:
            lose_keys()
        if page == CHECK_PAGE:
            # This page is recorded with its jobs pending, in the ledger and in Redis alike.
            run_id = running_run_id(store, FLOW)
            ledger = sum(store.page_counts(run_id).values(), Counts())
            live_vs_ledger.append((counters.totals(FLOW, run_id), ledger))

    defs = make_defs([make_flow(handler, records, on_fetch)], redis_url, database_url)
    result = run_flow(defs, FLOW, instance)

    assert result.success
    assert live_after_loss == [None]  # the keys really were gone
    ((live, ledger),) = live_vs_ledger
    assert live == ledger  # rebuilt from the ledger, then kept counting
    assert counters.totals(FLOW, result.run_id) == ledger_totals(store, result.run_id) == truth
    assert row_of(database_url, result.run_id).counter_mismatch == LOST_MID_RUN

    flushall(redis_url)  # lost again between extraction and finalization
    tick(defs, instance)

    row = row_of(database_url, result.run_id)
    assert_final(row, truth)
    assert row.counter_mismatch is not None
    assert LOST_MID_RUN in row.counter_mismatch
    assert REDIS_LOST_AT_FINALIZE in row.counter_mismatch
    assert run_keys_left(redis_url) == []


def test_redis_flushed_between_extraction_and_finalization(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    records = orders(RECORDS, PAGE)
    defs = make_defs(
        [make_flow(lambda batch: settle(batch, batch.records), records)], redis_url, database_url
    )
    result = run_flow(defs, FLOW, instance)
    assert result.success
    assert row_of(database_url, result.run_id).counter_mismatch is None

    flushall(redis_url)
    tick(defs, instance)

    row = row_of(database_url, result.run_id)
    assert_final(row, ground_truth(records))
    assert row.counter_mismatch is not None
    assert REDIS_LOST_AT_FINALIZE in row.counter_mismatch
    assert LOST_MID_RUN not in row.counter_mismatch
    assert run_keys_left(redis_url) == []


# ------------------------------------------------------------------------ 4. SCRIPT FLUSH


def test_script_flush_between_pages_reloads_the_scripts_and_loses_nothing(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    """Every handler call flushes Redis's script cache: the record of that page and the claim
    of the next find no script (NOSCRIPT), load it again and count exactly."""
    records = orders(RECORDS, PAGE)
    truth = ground_truth(records)
    client = redis.Redis.from_url(redis_url)
    shas = [
        hashlib.sha1(script.encode()).hexdigest()
        for script in (lua_pages.CLAIM_PAGE, lua_pages.RECORD_PAGE)
    ]
    before_flush: list[list[bool]] = []
    after_flush: list[list[bool]] = []

    def handler(batch: JobBatch) -> None:
        settle(batch, batch.records)
        before_flush.append(client.script_exists(*shas))
        client.script_flush()
        after_flush.append(client.script_exists(*shas))

    defs = make_defs([make_flow(handler, records)], redis_url, database_url)
    try:
        result = run_flow(defs, FLOW, instance)
        assert result.success
        assert len(after_flush) == math.ceil(RECORDS / PAGE)  # one flush per page
        assert all(exists == [False, False] for exists in after_flush)
        # A step claims its pages and records them 'dispatched' before its first handler,
        # with scripts reloaded after the previous step's flushes; between its handlers
        # no script runs.
        for position, exists in enumerate(before_flush):
            first_of_step = position % PAGES_PER_STEP == 0
            assert exists == ([True, True] if first_of_step else [False, False]), position
        assert client.script_exists(*shas) == [False, True]  # the last step's records
    finally:
        client.close()
    store = Ledger(url=database_url)
    assert LiveCounters(url=redis_url).totals(FLOW, result.run_id) == truth
    assert ledger_totals(store, result.run_id) == truth

    tick(defs, instance)
    row = row_of(database_url, result.run_id)
    assert_final(row, truth)
    assert row.counter_mismatch is None
    assert run_keys_left(redis_url) == []


# --------------------------------------------------------- 5. PostgreSQL stops during a step

STOP_PAGE = 7  # the middle page of the chunk [6-8]


def with_password(url: str) -> str:
    """The URL with a password (the test server trusts any): it must never be shown."""
    return url.replace(
        "postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{PASSWORD}@"
    )


def postgres_defs(flow: Flow, database_url: str, redis_url: str, retry_s: float) -> dg.Definitions:
    store = MetricsStore(url=database_url, connect_retry_seconds=retry_s)
    return build_definitions(
        [flow], resources={STORE_KEY: store, COUNTERS_KEY: RedisCounters(url=redis_url)}
    )


def test_postgres_stopping_mid_step_fails_it_clearly_and_the_retry_completes(
    postgres_server: PostgresServer,
    postgres_url: str,
    redis_url: str,
    instance: dg.DagsterInstance,
) -> None:
    """The handler of page 7 stops PostgreSQL; recording the page fails after the store's
    connect retry (0.5 s) with StoreUnavailableError. The outage lasts until the next page
    is read (the source starts PostgreSQL again, in the next step): Dagster's retry then
    completes the run with exact counts. No event of the run shows the password."""
    database_url = with_password(postgres_url)
    records = orders(RECORDS, PAGE)
    truth = ground_truth(records)
    outages: list[str] = []  # "stopped", then "restarted"

    def on_fetch(index: int) -> None:
        if outages == ["stopped"]:
            postgres_server.start()
            outages.append("restarted")

    def handler(batch: JobBatch) -> None:
        settle(batch, batch.records)
        if page_of(batch, PAGE) == STOP_PAGE and not outages:
            postgres_server.stop()
            outages.append("stopped")

    flow = make_flow(handler, records, on_fetch)
    defs = postgres_defs(flow, database_url, redis_url, retry_s=0.5)
    try:
        result = run_flow(defs, FLOW, instance)
    finally:
        postgres_server.start()

    assert result.success
    assert outages == ["stopped", "restarted"]
    (retry,) = retry_events(result)
    assert retry.step_key == f"{FLOW}_pages[pages_6_8]"
    error = retry.event_specific_data.error
    text = f"{error.message}\n{error.cause.message if error.cause else ''}"
    assert "StoreUnavailableError" in text
    assert "cannot connect to the metrics database" in text
    assert "***" in text  # the URL is named, its password masked
    logs = "\n".join(repr(entry) for entry in instance.all_logs(result.run_id))
    assert PASSWORD not in logs

    tick(defs, instance)
    row = row_of(database_url, result.run_id)
    assert_final(row, truth)
    assert row.counter_mismatch is None
    assert run_keys_left(redis_url) == []


class _Refused(logging.Handler):
    """Sets an event when the metrics store logs a failed connection attempt."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "unreachable" in record.getMessage():
            self.seen.set()


def test_postgres_outage_shorter_than_the_connect_retry_is_bridged(
    postgres_server: PostgresServer,
    postgres_url: str,
    redis_url: str,
    instance: dg.DagsterInstance,
) -> None:
    """The handler of page 7 stops PostgreSQL and a thread starts it again once the store
    has logged a refused connection: the store's connect retry (60 s) bridges the outage,
    so the step succeeds without a Dagster retry and the counts are exact."""
    records = orders(RECORDS, PAGE)
    truth = ground_truth(records)
    refused = _Refused()
    restarter: list[threading.Thread] = []

    def restart_after_refusal() -> None:
        refused.seen.wait(timeout=30)
        postgres_server.start()

    def handler(batch: JobBatch) -> None:
        settle(batch, batch.records)
        if page_of(batch, PAGE) == STOP_PAGE and not restarter:
            postgres_server.stop()
            restarter.append(threading.Thread(target=restart_after_refusal, daemon=True))
            restarter[0].start()

    db_log = logging.getLogger("resources.ledger.db")
    db_log.addHandler(refused)
    defs = postgres_defs(make_flow(handler, records), postgres_url, redis_url, retry_s=60)
    try:
        result = run_flow(defs, FLOW, instance)
    finally:
        db_log.removeHandler(refused)
        for thread in restarter:
            thread.join(timeout=60)
        postgres_server.start()

    assert result.success
    assert restarter and refused.seen.is_set()  # the store really met a stopped server
    assert retry_events(result) == []  # ... and bridged it inside the step

    tick(defs, instance)
    row = row_of(postgres_url, result.run_id)
    assert_final(row, truth)
    assert row.counter_mismatch is None
    assert run_keys_left(redis_url) == []
