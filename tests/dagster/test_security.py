"""Secrets and injection through real Dagster runs and real finalizer ticks: a real
PostgreSQL ledger reached with a password in its URL, a real Redis that requires a password
(CONFIG SET requirepass, reset afterwards), a real HTTP API on 127.0.0.1, closed ports for
failures, and the real ``flowctl`` console script. Nothing is faked; every output a user
could see (console, logging, Dagster's event log and storage on disk, run tags, asset and
check metadata, ledger rows, flowctl) is searched for the password."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import redis
import sqlalchemy as sa

from devservers import free_port
from flow_assets.build import build_definitions
from flow_assets.dagster_names import COUNTERS_KEY, STORE_KEY
from flow_assets.dispatch import JobBatch
from flow_assets.errors import FlowDefinitionError
from flow_assets.flow import Flow
from flow_assets.sources import HttpJsonSource, PageNumberPaginator
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.live.keys import run_key
from resources.live.redis_counters import RedisCounters
from resources.names import InvalidNameError
from tests.flowkit import assert_conserved, assert_counts, make_defs, row_of, run_flow, tick
from tests.httpfixture import ServedApi, serve_records

FLOWCTL = Path(sys.executable).parent / "flowctl"
PASSWORD = "Pw7x-sekr3t-q9z"
PATH = "/orders"


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture
def secret_pg_url(postgres_url: str) -> str:
    """The test database, reached with a password (the test server trusts local users)."""
    url = postgres_url.replace("://postgres@", f"://postgres:{PASSWORD}@", 1)
    assert PASSWORD in url
    return url


@pytest.fixture
def secret_redis_url(redis_url: str) -> Iterator[str]:
    """The test Redis, requiring a password for the duration of the test."""
    with redis.Redis.from_url(redis_url) as client:
        client.config_set("requirepass", PASSWORD)
    try:
        yield redis_url.replace("redis://", f"redis://:{PASSWORD}@", 1)
    finally:
        try:
            with redis.Redis.from_url(redis_url, password=PASSWORD) as admin:
                admin.config_set("requirepass", "")
        except redis.AuthenticationError:  # restarted meanwhile: no password set any more
            pass


def http_flow(
    api: ServedApi, name: str, handler: Callable[[JobBatch], None], **options: Any
) -> Flow:
    source = HttpJsonSource(
        api + PATH,
        paginator=PageNumberPaginator(total_pages_path="total_pages"),
        records_path="items",
        max_retries=0,
        partition_param="region",
    )
    options.setdefault("retry_policy", dg.RetryPolicy(max_retries=0))
    return Flow(name=name, source=source, key="id", handler=handler, pages_per_step=1, **options)


def env_resources(connect_retry_seconds: float = 10.0) -> dict[str, Any]:
    """The resources as production wires them: URLs from the environment via EnvVar."""
    return {
        STORE_KEY: MetricsStore(
            url=dg.EnvVar("FLOW_DATABASE_URL"), connect_retry_seconds=connect_retry_seconds
        ),
        COUNTERS_KEY: RedisCounters(url=dg.EnvVar("FLOW_REDIS_URL")),
    }


def flowctl(args: list[str], **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "DAGSTER_"))}
    env.update(env_vars)
    return subprocess.run(
        [str(FLOWCTL), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def visible_outputs(
    instance: dg.DagsterInstance, run_ids: list[str], flow_names: list[str]
) -> dict[str, str]:
    """Everything Dagster holds about the runs, as text, by where it came from."""
    seen: dict[str, str] = {}
    for run_id in run_ids:
        seen[f"event log {run_id}"] = "\n".join(str(r) for r in instance.all_logs(run_id))
        run = instance.get_run_by_id(run_id)
        assert run is not None
        seen[f"run tags {run_id}"] = json.dumps(dict(run.tags))
        seen[f"run config {run_id}"] = json.dumps(run.run_config, default=str)
    for name in flow_names:
        key = dg.AssetKey(["flows", name])
        records = instance.fetch_materializations(key, limit=100).records
        seen[f"materializations {name}"] = "\n".join(str(r) for r in records)
        check_key = dg.AssetCheckKey(key, "flow_status")
        history = instance.event_log_storage.get_asset_check_execution_history(check_key, 100)
        seen[f"check evaluations {name}"] = "\n".join(str(r) for r in history)
    # Dagster's storage on disk: run and event databases, snapshots, compute logs.
    for path in Path(instance.root_directory).rglob("*"):
        if path.is_file():
            seen[f"file {path}"] = path.read_bytes().decode("utf-8", errors="replace")
    return seen


def ledger_outputs(database_url: str, run_ids: list[str]) -> dict[str, str]:
    store = Ledger(url=database_url)
    seen: dict[str, str] = {}
    for run_id in run_ids:
        seen[f"flow_metrics {run_id}"] = str(store.runs(run_id=run_id))
        seen[f"job_failures {run_id}"] = str(store.job_failures(run_id))
        seen[f"rejected_records {run_id}"] = str(store.rejected_records(run_id))
    return seen


def assert_no_password(outputs: dict[str, str]) -> None:
    leaks = {where: text.count(PASSWORD) for where, text in outputs.items() if PASSWORD in text}
    assert not leaks, f"the password leaked into: {leaks}"


def records_with_duplicates() -> list[dict[str, Any]]:
    return [{"id": i % 40} for i in range(50)]  # 40 unique ids, 10 sent twice


# ------------------------------------------------------------------------- redaction tests


def test_passwords_in_database_and_redis_urls_never_reach_any_output(
    secret_pg_url: str,
    secret_redis_url: str,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FLOW_DATABASE_URL", secret_pg_url)
    monkeypatch.setenv("FLOW_REDIS_URL", secret_redis_url)

    def upsert(batch: JobBatch) -> None:
        for key, record in batch.items():
            if int(key) % 10 == 3:  # 4 of 40 jobs fail with an error quoting both URLs
                error = ConnectionError(f"upsert via {secret_pg_url} (cache {secret_redis_url})")
                batch.fail(record, error)
        logging.getLogger("user.handler").warning("page done; store at %s", secret_pg_url)

    with serve_records(records_with_duplicates(), page_size=10) as api:
        flow = http_flow(api, "secure_orders", upsert, max_failed_jobs=0.2)
        defs = build_definitions([flow], resources=env_resources())
        result = run_flow(defs, "secure_orders", instance)
        tick(defs, instance)
    run_id = result.run_id

    assert result.success
    row = row_of(secret_pg_url, run_id)
    assert row.flow_status == "partial_success"
    assert_counts(row, Counts(source=50, dispatched=40, skipped=10, completed=36, failed=4))
    assert_conserved(row)
    failures = Ledger(url=secret_pg_url).job_failures(run_id)
    assert len(failures) == 4
    # The error text is kept, with the URLs' passwords masked.
    assert all("postgresql+psycopg://postgres:***@127.0.0.1:" in f.error for f in failures)
    assert all("redis://:***@127.0.0.1:" in f.error for f in failures)

    outputs = visible_outputs(instance, [run_id], ["secure_orders"])
    outputs.update(ledger_outputs(secret_pg_url, [run_id]))
    env = {"FLOW_DATABASE_URL": secret_pg_url, "FLOW_HOME": str(Path(instance.root_directory))}
    shown = flowctl(["status", "--run", run_id, "--json"], **env)
    assert json.loads(shown.stdout)["runs"][0]["run_id"] == run_id
    outputs["flowctl status --run --json"] = shown.stdout + shown.stderr
    shown = flowctl(["status", "--run", "no-such-run"], **env)  # an error naming the database
    assert shown.returncode == 2  # a usage error
    assert "postgresql+psycopg://postgres:***@" in shown.stderr
    outputs["flowctl error"] = shown.stdout + shown.stderr
    captured = capfd.readouterr()
    outputs.update(stdout=captured.out, stderr=captured.err, logging=caplog.text)
    # The net catches what it should: the handler's own log line (the user's business,
    # not ours) is there with the password. Everything else must be clean.
    assert f"store at {secret_pg_url}" in outputs["logging"]
    outputs["logging"] = outputs["logging"].replace(f"store at {secret_pg_url}", "")
    outputs["stderr"] = outputs["stderr"].replace(f"store at {secret_pg_url}", "")
    assert_no_password(outputs)


def test_a_handler_exception_quoting_a_url_is_redacted_in_dagster_events(
    secret_pg_url: str,
    secret_redis_url: str,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FLOW_DATABASE_URL", secret_pg_url)
    monkeypatch.setenv("FLOW_REDIS_URL", secret_redis_url)

    def crash_on_page_one(batch: JobBatch) -> None:
        if "15" in batch.keys:
            raise ConnectionError(f"cannot write to {secret_pg_url}")

    with serve_records([{"id": i} for i in range(30)], page_size=10) as api:
        flow = http_flow(api, "secure_crash", crash_on_page_one)
        defs = build_definitions([flow], resources=env_resources())
        result = run_flow(defs, "secure_crash", instance)
        tick(defs, instance)

    assert not result.success
    row = row_of(secret_pg_url, result.run_id)
    assert row.flow_status == "failed"
    assert "ConnectionError: cannot write to postgresql+psycopg://postgres:***@" in (
        row.failure_reason or ""
    )
    outputs = visible_outputs(instance, [result.run_id], ["secure_crash"])
    outputs.update(ledger_outputs(secret_pg_url, [result.run_id]))
    captured = capfd.readouterr()
    outputs.update(stdout=captured.out, stderr=captured.err)
    assert_no_password(outputs)


@pytest.mark.parametrize("closed", ["database", "redis"])
def test_unreachable_servers_are_reported_without_the_password(
    closed: str,
    secret_pg_url: str,
    secret_redis_url: str,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there
    database_url, redis_url = secret_pg_url, secret_redis_url
    if closed == "database":
        database_url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}/flows"
    else:
        redis_url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    monkeypatch.setenv("FLOW_DATABASE_URL", database_url)
    monkeypatch.setenv("FLOW_REDIS_URL", redis_url)

    with serve_records([{"id": i} for i in range(20)], page_size=10) as api:
        flow = http_flow(api, "secure_down", lambda batch: None)
        defs = build_definitions([flow], resources=env_resources(connect_retry_seconds=0.5))
        result = run_flow(defs, "secure_down", instance)
        if closed == "database":
            with pytest.raises(Exception) as raised:  # the tick cannot reach the ledger either
                tick(defs, instance)
            error = raised.value
        else:
            tick(defs, instance)  # the ledger is the source of truth: Redis is not needed

    assert not result.success
    outputs = visible_outputs(instance, [result.run_id], ["secure_down"])
    if closed == "database":
        assert "metrics database" in str(error)
        assert "***@127.0.0.1:" in str(error)  # the URL is named, masked
        outputs["tick error"] = "".join(traceback.format_exception(error))
    else:
        # The ledger was reachable: the run was recorded and finalized from it, its reason
        # naming the unreachable Redis, masked (the reasons are searched too).
        row = row_of(secret_pg_url, result.run_id)
        assert (row.flow_name, row.flow_status) == ("secure_down", "failed")
        assert "Redis at" in row.failure_reason and "***@127.0.0.1:" in row.failure_reason
        outputs.update(ledger_outputs(secret_pg_url, [result.run_id]))
    if closed == "database":
        shown = flowctl(
            ["db", "current"], FLOW_DATABASE_URL=database_url.replace("+psycopg", "+asyncpg")
        )
        assert shown.returncode == 2 and "FLOW_DATABASE_URL" in shown.stderr
        outputs["flowctl db current (bad driver)"] = shown.stdout + shown.stderr
    captured = capfd.readouterr()
    outputs.update(stdout=captured.out, stderr=captured.err, logging=caplog.text)
    assert_no_password(outputs)


# ------------------------------------------------------------------------------ SQL is data

EVIL_PARTITION = "eu'); DROP TABLE flow_metrics; --\"x"
EVIL_KEYS = [
    "k'); DROP TABLE flow_page_progress; --",
    "q\"; DELETE FROM flow_metrics WHERE '1'='1",
    "x' OR '1'='1",
    "semi;colon\\back",
]


def test_quotes_and_sql_in_keys_and_partitions_are_stored_as_plain_data(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    records = [{"id": key} for key in EVIL_KEYS] + [{"id": f"plain-{i}"} for i in range(6)]
    records += [{"id": EVIL_KEYS[0]}, {"no_id": "'); DROP TABLE flow_rejected_records; --"}]

    def fail_evil(batch: JobBatch) -> None:
        if EVIL_KEYS[2] in batch.keys:
            error = ValueError("bad row: x' OR '1'='1; DROP TABLE flow_job_failures")
            batch.fail(EVIL_KEYS[2], error)

    with serve_records(records, page_size=4) as api:
        bystander = http_flow(api, "bystander", lambda batch: None)
        evil = http_flow(
            api,
            "evil_input",
            fail_evil,
            partitions=dg.StaticPartitionsDefinition([EVIL_PARTITION]),
            max_failed_jobs=1,
        )
        defs = make_defs([bystander, evil], redis_url, database_url)
        before = run_flow(defs, "bystander", instance)
        tick(defs, instance)
        result = run_flow(defs, "evil_input", instance, partition_key=EVIL_PARTITION)
        tick(defs, instance)
        assert {r.query.get("region") for r in api.requests if "region" in r.query} == {
            EVIL_PARTITION
        }

    assert before.success and result.success
    row = row_of(database_url, result.run_id)
    assert row.partition_key == EVIL_PARTITION
    assert row.flow_status == "partial_success"
    assert_counts(
        row, Counts(source=12, dispatched=10, skipped=1, rejected=1, completed=9, failed=1)
    )
    store = Ledger(url=database_url)
    assert set(EVIL_KEYS) <= set(store.claimed_keys(result.run_id))
    [failure] = store.job_failures(result.run_id)
    assert failure.record_key == EVIL_KEYS[2]
    assert failure.error == "ValueError: bad row: x' OR '1'='1; DROP TABLE flow_job_failures"
    [reject] = store.rejected_records(result.run_id)
    assert json.loads(reject.raw_record) == records[-1]
    # Every table is still there and the earlier run's row is untouched.
    tables = set(sa.inspect(store.engine()).get_table_names())
    assert {"flow_metrics", "flow_page_progress", "flow_rejected_records"} <= tables
    assert "flow_job_failures" in tables
    assert row_of(database_url, before.run_id).flow_status == "partial_success"
    assert len(store.runs()) == 2
    tag_run = instance.get_run_by_id(result.run_id)
    assert tag_run is not None and tag_run.tags.get("dagster/partition") == EVIL_PARTITION


# ------------------------------------------------------------------- Redis patterns are data

PATTERN_CHARS = ["*", "?", "[", "]", "{", "}", ":"]


@pytest.mark.parametrize("char", PATTERN_CHARS)
def test_flow_names_with_redis_pattern_characters_are_refused(char: str) -> None:
    with (
        serve_records([], page_size=1) as api,
        pytest.raises(FlowDefinitionError, match="is not a valid name"),
    ):
        http_flow(api, f"orders{char}", lambda batch: None)
    with pytest.raises(InvalidNameError):
        run_key(f"orders{char}", "run-1", "seen")
    with pytest.raises(ValueError, match="is not a Dagster run id"):
        run_key("orders", f"run{char}1", "seen")


PATTERN_KEYS = ["*", "?", "[a-z]", "[", "]", "{orders}", "{", "}", "a:b", ":", "flow:{*}:*", "\\*"]


def test_record_keys_with_redis_pattern_characters_are_just_data(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    records = [{"id": key} for key in PATTERN_KEYS] + [{"id": "a"}, {"id": "b"}]
    records += [{"id": "*"}, {"id": "flow:{*}:*"}, {"id": "[a-z]"}]  # exact duplicates
    handled: list[str] = []
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        client.set("unrelated:*", "keep me")
        client.hset("flow:{other_flow:run-1}:seen", mapping={"*": "0"})
        with serve_records(records, page_size=5) as api:
            flow = http_flow(api, "pattern_keys", lambda batch: handled.extend(batch.keys))
            defs = make_defs([flow], redis_url, sqlite_url)
            result = run_flow(defs, "pattern_keys", instance)
            tick(defs, instance)
        assert client.get("unrelated:*") == "keep me"
        assert client.hgetall("flow:{other_flow:run-1}:seen") == {"*": "0"}
        left = sorted(client.scan_iter(match="flow:{pattern_keys:*"))

    unique = len(PATTERN_KEYS) + 2
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "partial_success"
    assert_counts(row, Counts(source=unique + 3, dispatched=unique, skipped=3, completed=unique))
    assert sorted(handled) == sorted({str(r["id"]) for r in records})
    assert left == []
