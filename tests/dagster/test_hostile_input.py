"""Hostile and malformed input through real Dagster runs and real finalizer ticks, on real
Redis and real PostgreSQL/SQLite, with a real HTTP API on 127.0.0.1 answering badly on
purpose (injected non-JSON bodies, wrong shapes, 404, 503), and the real ``flowctl``
console script. Nothing is faked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from flow_assets.build import INTERVAL_ENV, build_definitions
from flow_assets.dispatch import JobBatch
from flow_assets.errors import ConfigurationError, FlowDefinitionError
from flow_assets.flow import Flow
from flow_assets.sources import HttpJsonSource, PageNumberPaginator
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from tests.flowkit import (
    assert_conserved,
    assert_counts,
    latest_check,
    make_defs,
    row_of,
    run_flow,
    run_keys_left,
    status_tag,
    tick,
)
from tests.httpfixture import ServedApi, serve_records

FLOWCTL = Path(sys.executable).parent / "flowctl"
PASSWORD = "hostile-pw-9c1e"
PATH = "/orders"
SOURCE_NAME = "127.0.0.1/orders"


def http_flow(
    api: ServedApi,
    name: str,
    handler: Callable[[JobBatch], None] = lambda batch: None,
    *,
    http_retries: int = 0,
    step_retries: int = 0,
    **options: Any,
) -> Flow:
    """A flow over ``api``/orders, one page per step; no backoff, so failures fail fast."""
    source = HttpJsonSource(
        api + PATH,
        paginator=PageNumberPaginator(total_pages_path="total_pages"),
        records_path="items",
        max_retries=http_retries,
        backoff_factor=0,
        timeout=5,
    )
    return Flow(
        name=name,
        source=source,
        key="id",
        handler=handler,
        pages_per_step=1,
        retry_policy=dg.RetryPolicy(max_retries=step_retries),
        **options,
    )


# --------------------------------------------------------------- pages the source cannot read

BAD_PAGES = {
    "not_json": (
        {"body": "<html><h1>Bad gateway</h1></html>", "content_type": "text/html"},
        "the body is not JSON (text/html)",
    ),
    "records_path_missing": (
        {"body": '{"data": [{"id": 1}]}', "content_type": "application/json"},
        "records_path 'items' is not in the body",
    ),
    "records_not_a_list": (
        {"body": '{"items": {"id": 1}}', "content_type": "application/json"},
        "records_path 'items' holds a JSON object (keys: id), not a list",
    ),
    "http_404": ({"status": 404}, "HTTP 404 (not retried)"),
    "http_503_until_retries_exhausted": ({"status": 503}, "HTTP 503 still, after 2 retries"),
}


@pytest.mark.parametrize(
    "case",
    BAD_PAGES,
)
def test_an_unreadable_page_fails_the_run_naming_source_page_and_problem(
    case: str, redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    injection, problem = BAD_PAGES[case]
    records = [{"id": i} for i in range(30)]  # pages 0, 1, 2; page 1 always answers badly
    with serve_records(records, page_size=10) as api:
        api.inject(path=PATH, query={"page": "1"}, times=None, **injection)
        flow = http_flow(api, "orders_api", http_retries=2, step_retries=1)
        defs = make_defs([flow], redis_url, sqlite_url)
        result = run_flow(defs, "orders_api", instance)
        tick(defs, instance)
        page_one_requests = api.count_requests(PATH, page="1")

    assert not result.success
    # Two step attempts (Dagster RetryPolicy); 5xx are also retried per request (urllib3).
    assert page_one_requests == (6 if case.startswith("http_503") else 2)
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "failed"
    reason = row.failure_reason or ""
    assert reason.startswith("Dagster run failed; extraction incomplete")
    assert "orders_api_pages[pages_1_1]" in reason
    assert f"Source '{SOURCE_NAME}', page 1 (GET http://127.0.0.1:" in reason
    assert problem in reason
    # Pages 0 and 2 were read and handled; nothing of page 1 is counted or lost.
    assert_counts(row, Counts(source=20, dispatched=20, completed=20))
    assert_conserved(row)
    assert row.pages_done == 2 and not row.extraction_done
    assert status_tag(instance, result.run_id) == "failed"
    check = latest_check(instance, "orders_api")
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.ERROR
    assert run_keys_left(redis_url) == []


def test_an_unreadable_first_page_fails_the_plan_with_a_clear_reason(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    with serve_records([{"id": i} for i in range(30)], page_size=10) as api:
        api.inject(
            path=PATH, query={"page": "0"}, times=None, body="oops", content_type="text/plain"
        )
        defs = make_defs([http_flow(api, "orders_api")], redis_url, sqlite_url)
        result = run_flow(defs, "orders_api", instance)
        tick(defs, instance)
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "failed"
    assert "orders_api_plan" in (row.failure_reason or "")
    assert f"Source '{SOURCE_NAME}', page 0" in (row.failure_reason or "")
    assert "the body is not JSON (text/plain): 'oops'" in (row.failure_reason or "")
    assert_counts(row, Counts())
    assert run_keys_left(redis_url) == []


# ------------------------------------------------------------ records that cannot become jobs

OVERSIZED = {"id": "big-1", "blob": "x" * 400}
BAD_RECORDS: list[tuple[Any, str]] = [
    ({"value": 1}, "record has no key field 'id'"),
    ({"id": [1, 2]}, "record key has type list; expected str or int"),
    ({"id": 1.5}, "record key has type float; expected str or int"),
    ({"id": None}, "record key has type NoneType; expected str or int"),
    ({"id": True}, "record key has type bool; expected str or int"),
    ("just a string", "record is a str, not an object"),
    (OVERSIZED, "over max_record_bytes=200"),
]


def hostile_records() -> list[Any]:
    """30 records: 23 good ones with unique ids, the bad ones spread over the pages."""
    records: list[Any] = [{"id": f"ok-{i}", "n": i} for i in range(23)]
    for position, (record, _) in zip((2, 5, 11, 14, 19, 25, 29), BAD_RECORDS, strict=True):
        records.insert(position, record)
    return records


def run_hostile_flow(
    redis_url: str,
    database_url: str,
    instance: dg.DagsterInstance,
    handler: Callable[[JobBatch], None] = lambda batch: None,
) -> dg.ExecuteInProcessResult:
    with serve_records(hostile_records(), page_size=10) as api:
        flow = http_flow(api, "orders_api", handler, max_record_bytes=200, max_failed_jobs=1)
        defs = make_defs([flow], redis_url, database_url)
        result = run_flow(defs, "orders_api", instance)
        tick(defs, instance)
    return result


def test_rejected_records_are_counted_and_quarantined_with_reason_and_raw_record(
    redis_url: str, database_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    records = hostile_records()
    handled: list[str] = []
    result = run_hostile_flow(redis_url, database_url, instance, lambda b: handled.extend(b.keys))

    assert result.success
    row = row_of(database_url, result.run_id)
    assert row.flow_status == "partial_success"
    assert row.failure_reason == "7 records rejected"
    assert_counts(row, Counts(source=30, dispatched=23, rejected=7, completed=23))
    assert_conserved(row)
    assert sorted(handled) == sorted(f"ok-{i}" for i in range(23))

    stored = Ledger(url=database_url).rejected_records(result.run_id)
    expected = {json.dumps(record): reason for record, reason in BAD_RECORDS}
    assert len(stored) == len(BAD_RECORDS)
    for reject in stored:
        # The raw record is kept as the source sent it; the reason says why it was refused.
        assert reject.raw_record in expected, reject
        assert expected[reject.raw_record] in reject.reason
        assert records[reject.page_index * 10 + reject.position] == json.loads(reject.raw_record)

    shown = flowctl(["status", "--run", result.run_id, "--json"], database_url, tmp_path)
    assert shown.returncode == 0, shown.stderr
    payload = json.loads(shown.stdout)
    assert [run["rejected_records"] for run in payload["runs"]] == [7]
    assert {r["raw_record"]: r["reason"] for r in payload["rejected_records"]} == {
        r.raw_record: r.reason for r in stored
    }


def test_flowctl_status_run_shows_the_rejected_records_and_failed_jobs(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    def fail_one(batch: JobBatch) -> None:
        if "ok-3" in batch.keys:
            batch.fail("ok-3", ValueError("order ok-3 has no customer"))

    result = run_hostile_flow(redis_url, sqlite_url, instance, fail_one)
    assert row_of(sqlite_url, result.run_id).flow_status == "partial_success"

    shown = flowctl(["status", "--run", result.run_id], sqlite_url, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "partial_success" in shown.stdout
    for _, reason in BAD_RECORDS:
        assert reason in shown.stdout, f"{reason!r} missing from:\n{shown.stdout}"
    assert '"just a string"' in shown.stdout  # the raw record itself
    assert "ValueError: order ok-3 has no customer" in shown.stdout


def flowctl(args: list[str], database_url: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The real console script, on the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "DAGSTER_"))}
    env.update(FLOW_DATABASE_URL=database_url, FLOW_HOME=str(home / "flow_home"))
    return subprocess.run(
        [str(FLOWCTL), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


# ------------------------------------------------------------------ handlers that fail jobs


def failing_some(batch: JobBatch) -> None:
    """Fails the orders whose id ends in 7 (3 of 60), completes the rest."""
    for key, record in batch.items():
        if int(record["id"]) % 20 == 7:
            batch.fail(record, ValueError(f"amount of order {key} is negative"))
        else:
            batch.complete(record)


@pytest.mark.parametrize(
    ("max_failed_jobs", "status", "reason"),
    [
        (3, "partial_success", "3 jobs failed (tolerated)"),
        (2, "failed", "3 of 60 jobs failed (max_failed_jobs=2)"),
        (0.05, "partial_success", "3 jobs failed (tolerated)"),
        (0.049, "failed", "3 of 60 jobs failed (max_failed_jobs=0.049)"),
    ],
)
def test_failed_jobs_keep_their_error_and_the_tolerance_decides_the_status(
    max_failed_jobs: float,
    status: str,
    reason: str,
    redis_url: str,
    sqlite_url: str,
    instance: dg.DagsterInstance,
) -> None:
    with serve_records([{"id": i} for i in range(60)], page_size=20) as api:
        flow = http_flow(api, "payments", failing_some, max_failed_jobs=max_failed_jobs)
        defs = make_defs([flow], redis_url, sqlite_url)
        result = run_flow(defs, "payments", instance)
        tick(defs, instance)

    assert result.success  # failed jobs are data, not a failed Dagster run
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == status
    assert row.failure_reason == reason
    assert_counts(row, Counts(source=60, dispatched=60, completed=57, failed=3))
    assert_conserved(row)
    failures = Ledger(url=sqlite_url).job_failures(result.run_id)
    assert {(f.record_key, f.page_index, f.error) for f in failures} == {
        (str(i), i // 20, f"ValueError: amount of order {i} is negative") for i in (7, 27, 47)
    }
    severity = (
        dg.AssetCheckSeverity.WARN if status == "partial_success" else dg.AssetCheckSeverity.ERROR
    )
    assert latest_check(instance, "payments").severity == severity
    assert run_keys_left(redis_url) == []


def test_a_handler_raising_for_a_whole_page_fails_its_jobs_with_the_error_kept(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    attempts: list[str] = []

    def raising_on_page_one(batch: JobBatch) -> None:
        if "15" in batch.keys:
            attempts.append(batch.keys[0])
            raise RuntimeError("payments API rejected the batch: HTTP 500")

    with serve_records([{"id": i} for i in range(30)], page_size=10) as api:
        flow = http_flow(api, "payments", raising_on_page_one, step_retries=1)
        defs = make_defs([flow], redis_url, sqlite_url)
        result = run_flow(defs, "payments", instance)
        tick(defs, instance)

    assert not result.success
    assert len(attempts) == 2  # the first attempt and its one retry
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "failed"
    assert "RuntimeError: payments API rejected the batch: HTTP 500" in (row.failure_reason or "")
    assert run_keys_left(redis_url) == []
    failures = Ledger(url=sqlite_url).job_failures(result.run_id)
    assert {f.record_key for f in failures} == {str(i) for i in range(10, 20)}
    assert all("payments API rejected the batch" in f.error for f in failures)
    assert_counts(row, Counts(source=30, dispatched=30, completed=20, failed=10))


# ---------------------------------------------------------- invalid definitions and settings


def _tiny_flow(name: str, **options: Any) -> Flow:
    source = HttpJsonSource(
        "http://127.0.0.1:9/orders",
        paginator=PageNumberPaginator(total_pages_path="total_pages"),
        records_path="items",
    )
    return Flow(name=name, source=source, key="id", handler=lambda batch: None, **options)


@pytest.mark.parametrize(
    ("make_flows", "fragment"),
    [
        (lambda: [_tiny_flow("orders"), _tiny_flow("orders")], "two flows are named 'orders'"),
        (lambda: [_tiny_flow("Orders-API")], "Flow name 'Orders-API' is not a valid name"),
        (lambda: [_tiny_flow("orders", max_failed_jobs=1.5)], "max_failed_jobs=1.5"),
        (lambda: [_tiny_flow("orders", schedule="hourly")], "schedule='hourly'"),
        (lambda: [_tiny_flow("orders", retries=3)], "unknown option(s) ['retries']"),
    ],
)
def test_invalid_flow_definitions_fail_at_load_naming_the_option(
    make_flows: Callable[[], list[Flow]], fragment: str
) -> None:
    with pytest.raises(FlowDefinitionError) as raised:
        build_definitions(make_flows())
    assert fragment in str(raised.value)


def test_a_bad_finalizer_interval_fails_at_load_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "abc")
    with pytest.raises(ConfigurationError) as raised:
        build_definitions([_tiny_flow("orders")])
    assert f"{INTERVAL_ENV}='abc' is invalid" in str(raised.value)
    assert "whole number of seconds" in str(raised.value)


BAD_URLS = {
    "FLOW_DATABASE_URL": f"mysql://app:{PASSWORD}@db.internal:3306/flows",
    "FLOW_REDIS_URL": f"http://:{PASSWORD}@cache.internal:6379/0",
}


@pytest.mark.parametrize("variable", list(BAD_URLS))
def test_a_bad_url_setting_fails_at_load_naming_the_variable(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, BAD_URLS[variable])
    with pytest.raises(ConfigurationError) as raised:
        build_definitions([_tiny_flow("orders")])
    assert variable in str(raised.value)
    assert PASSWORD not in str(raised.value)


@pytest.mark.parametrize("variable", list(BAD_URLS))
def test_a_run_with_a_bad_url_setting_fails_naming_the_variable_without_the_password(
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    sqlite_url: str,
    instance: dg.DagsterInstance,
) -> None:
    """Through the default resources (EnvVar), as `dagster dev` and `flowctl run` load them;
    the setting goes bad after the code location loaded (e.g. a run worker's environment)."""
    monkeypatch.setenv("FLOW_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("FLOW_REDIS_URL", redis_url)
    defs = build_definitions([_tiny_flow("orders")])
    monkeypatch.setenv(variable, BAD_URLS[variable])
    result = run_flow(defs, "orders", instance)
    assert not result.success
    messages = [
        str(event.event_specific_data)
        for event in result.all_events
        if event.event_type
        in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RESOURCE_INIT_FAILURE)
    ]
    assert messages, "the run failed without a step or resource failure event"
    assert PASSWORD not in "\n".join(str(e) for e in instance.all_logs(result.run_id))
    assert any(variable in message for message in messages), messages
