"""No Redis key outlives its run, for real: Dagster runs (instance_for_test, execute_in_process),
real finalizer sensor ticks (with the cursor the daemon would keep), real Redis, real
PostgreSQL and SQLite, and the real ``flowctl`` console script in a subprocess. Stray keys
are made the way production makes them: a failed run nobody finalized yet, a page step that
outlived its run's finalization (real ``process_page``), a crashed process's counters, and
another deployment's run sharing the server. Nothing is faked."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import redis

from flow_assets.build import build_definitions
from flow_assets.cli import render as cli_render
from flow_assets.dagster_names import COUNTERS_KEY, SENSOR_NAME, STORE_KEY
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow, Handler
from flow_assets.sources import FileSource
from flow_assets.sources.base import Page
from resources.counts import Counts
from resources.errors import RunFinalError
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.live.counters import LiveCounters
from resources.live.keys import ALL_RUN_KEYS_PATTERN, parse_run_key, run_keys
from resources.live.redis_counters import RedisCounters
from sensors.cleanup import StrayRun
from sensors.sensor import CLEANUP_EVERY_TICKS
from tests.counters_helpers import record_page, ttl_report
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
from tests.ledger_helpers import process_page

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOWCTL = REPO_ROOT / ".venv" / "bin" / "flowctl"
PAGE_SIZE = 5
KEY_TTL_S = 600
IDS = [*range(11), 2]  # 12 records in 3 pages: 0-4, 5-9 and 10 with a duplicate of 2
EXPECTED = Counts(source=12, dispatched=11, skipped=1, completed=11)
# Another deployment sharing the Redis server: its run is not in this ledger.
FOREIGN = ("elsewhere", "run-of-another-deployment")


def records(ids: list[int]) -> list[dict[str, int]]:
    return [{"id": i, "value": i * 10} for i in ids]


def leaky_flow(tmp_path: Path, handler: Handler = lambda batch: None, **options) -> Flow:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records(IDS)))
    return Flow(
        name="leaky",
        source=FileSource(data, page_size=PAGE_SIZE),
        key="id",
        handler=handler,
        pages_per_step=1,
        **options,
    )


def ttls(client: redis.Redis) -> dict[str, int]:
    """Seconds to live of every run-scoped key on the server (-1: none)."""
    return {key: int(client.ttl(key)) for key in client.scan_iter(match=ALL_RUN_KEYS_PATTERN)}


def test_every_run_key_has_a_ttl_while_running_and_none_is_left_after(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    counters = RedisCounters(url=redis_url, key_ttl_seconds=KEY_TTL_S)
    seen: list[dict[str, int]] = []
    reported: list[dict[str, int]] = []

    def handler(batch: JobBatch) -> None:  # looks at Redis from inside the running step
        keys = ttls(client)
        seen.append(keys)
        flow_name, run_id, _ = parse_run_key(next(iter(keys))) or ("", "", "")
        reported.append(ttl_report(counters.counters(), flow_name, run_id))

    flow = leaky_flow(tmp_path, handler)
    defs = build_definitions(
        [flow], resources={STORE_KEY: MetricsStore(url=sqlite_url), COUNTERS_KEY: counters}
    )
    try:
        result = run_flow(defs, flow.name, instance)
        assert result.success and len(seen) == 3
        for keys, report in zip(seen, reported, strict=True):
            assert keys and all(0 < ttl <= KEY_TTL_S for ttl in keys.values()), keys
            assert set(report) == set(keys)
            assert all(0 < ttl <= KEY_TTL_S for ttl in report.values()), report
        # By the last page every kind of key exists, each with its TTL.
        assert set(seen[-1]) == set(run_keys(flow.name, result.run_id))
        left = ttls(client)  # run over, not finalized yet: keys still there, still expiring
        assert set(left) == set(run_keys(flow.name, result.run_id))
        assert all(0 < ttl <= KEY_TTL_S for ttl in left.values())
    finally:
        client.close()

    tick(defs, instance)
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "partial_success"
    assert_counts(row, EXPECTED)
    assert run_keys_left(redis_url) == []


def test_keys_of_a_failed_run_are_removed_by_the_finalizer(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    def handler(batch: JobBatch) -> None:
        if "7" in batch.keys:
            raise dg.Failure("downstream rejected the batch", allow_retries=False)

    flow = leaky_flow(tmp_path, handler)
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, flow.name, instance)
    failed = instance.get_run_by_id(result.run_id)
    assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
    # Orphaned: its Dagster run is over, its keys are still in Redis.
    assert run_keys_left(redis_url) == sorted(run_keys(flow.name, result.run_id))

    tick(defs, instance)
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "failed"
    # Pages 0 and 2 done; page 1 (ids 5-9) dispatched and lost.
    assert_counts(row, Counts(source=12, dispatched=11, skipped=1, completed=6, failed=5))
    assert_conserved(row)
    assert status_tag(instance, result.run_id) == "failed"
    assert run_keys_left(redis_url) == []


def finished_run_with_stray_keys(
    tmp_path: Path, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> tuple[dg.Definitions, Flow, str]:
    """A finalized run whose keys came back (a page step that outlived the finalization:
    its Redis claim rebuilt them, the ledger then refused its page), plus keys of a run this
    ledger does not know."""
    flow = leaky_flow(tmp_path)
    defs = make_defs([flow], redis_url, database_url)
    run_id = run_flow(defs, flow.name, instance).run_id
    tick(defs, instance)
    before = row_of(database_url, run_id)
    assert before.flow_status == "partial_success" and run_keys_left(redis_url) == []

    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    with pytest.raises(RunFinalError):  # nothing is recorded after the final write
        process_page(flow, run_id, Page(0, records(IDS[:PAGE_SIZE])), counters, store)
    counters.start_run(*FOREIGN)
    after = row_of(database_url, run_id)
    assert (after.flow_status, after.counts) == (before.flow_status, before.counts)
    assert run_keys_left(redis_url) == sorted([*run_keys(flow.name, run_id), run_keys(*FOREIGN)[0]])
    return defs, flow, run_id


def flowctl_env(database_url: str, redis_url: str, home: Path) -> dict[str, str]:
    env = {**os.environ, "FLOW_DATABASE_URL": database_url, "FLOW_REDIS_URL": redis_url}
    return {**env, "FLOW_HOME": str(home)}


def flowctl(*args: str, env: dict[str, str]) -> str:
    """The real console script, in a subprocess; asserts exit code 0, returns stdout."""
    done = subprocess.run(
        [str(FLOWCTL), *args],
        env=env,
        cwd=env["FLOW_HOME"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def line_of(output: str, run_id: str) -> str:
    [line] = [line for line in output.splitlines() if run_id in line]
    return line


def test_flowctl_cleanup_lists_then_removes_stray_keys_of_finished_runs(
    redis_url: str, postgres_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    _, flow, run_id = finished_run_with_stray_keys(tmp_path, redis_url, postgres_url, instance)
    strays = run_keys_left(redis_url)
    env = flowctl_env(postgres_url, redis_url, tmp_path)

    listed = flowctl("cleanup", "--dry-run", env=env)
    assert line_of(listed, run_id).startswith(f"{flow.name} {run_id} ")
    assert line_of(listed, run_id).endswith(": would remove")
    assert line_of(listed, FOREIGN[1]).endswith(": kept (no such run in this ledger)")
    assert run_keys_left(redis_url) == strays  # a dry run removes nothing

    cleaned = flowctl("cleanup", env=env)
    assert line_of(cleaned, run_id).endswith(": removed")
    assert line_of(cleaned, FOREIGN[1]).endswith(": kept (no such run in this ledger)")
    assert run_keys_left(redis_url) == [run_keys(*FOREIGN)[0]]
    assert row_of(postgres_url, run_id).flow_status == "partial_success"


def test_keys_left_by_a_crashed_process_expire_by_their_ttl(redis_url: str) -> None:
    counters = LiveCounters(url=redis_url, key_ttl_seconds=2)
    flow_name, run_id = "crashed", "run-whose-process-died"
    keys = run_keys(flow_name, run_id)
    counters.start_run(flow_name, run_id)
    assert counters.claim_page(flow_name, run_id, 0, ["a", "b", "a"]) == [True, True, False]
    # True: the run's keys were there and the script wrote (and gave a TTL to) all of them.
    assert record_page(counters, flow_name, run_id, 0, Counts(3, 2, 1, 0, 2, 0))
    # ...then the process dies: nothing finalizes or cleans this run.
    report = ttl_report(counters, flow_name, run_id)  # some may have expired already
    assert set(report) <= set(keys) and all(0 <= ttl <= 2 for ttl in report.values())
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 15
        while client.exists(*keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.exists(*keys) == 0
    finally:
        client.close()
    assert run_keys_left(redis_url) == []


def tick_with_cursor(
    defs: dg.Definitions, instance: dg.DagsterInstance, ticks: int
) -> dg.SensorResult:
    """One real evaluation of the finalizer sensor after ``ticks`` earlier ticks."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    cursor = json.dumps({"ticks": ticks, "finalized_total": 1})
    with dg.build_sensor_context(
        instance=instance, resources=defs.resources, cursor=cursor
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_the_sensor_removes_stray_keys_every_nth_tick(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    defs, _, run_id = finished_run_with_stray_keys(tmp_path, redis_url, sqlite_url, instance)
    strays = run_keys_left(redis_url)

    quiet = tick_with_cursor(defs, instance, CLEANUP_EVERY_TICKS - 2)
    assert json.loads(quiet.cursor or "{}")["ticks"] == CLEANUP_EVERY_TICKS - 1
    assert run_keys_left(redis_url) == strays  # not a cleanup tick

    cleaning = tick_with_cursor(defs, instance, CLEANUP_EVERY_TICKS - 1)
    assert json.loads(cleaning.cursor or "{}") == {
        "ticks": CLEANUP_EVERY_TICKS,
        "finalized_total": 1,
    }
    assert cleaning.skip_reason is not None
    assert "stray runs cleaned: 1" in str(cleaning.skip_reason.skip_message)
    assert run_keys_left(redis_url) == [run_keys(*FOREIGN)[0]]  # the unknown run's are kept
    assert row_of(sqlite_url, run_id).flow_status == "partial_success"


def test_flowctl_cleanup_output_shows_each_stray_runs_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    strays = [StrayRun("orders", "run-1", "completed"), StrayRun("orders", "run-2", "failed")]
    cli_render.print_strays(strays, dry_run=True)
    out = capsys.readouterr().out
    assert "orders run-1 [completed]: would remove" in out
    assert "orders run-2 [failed]: would remove" in out
