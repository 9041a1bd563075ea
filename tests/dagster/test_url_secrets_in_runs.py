"""Malformed URLs (passwords with reserved characters not percent-encoded) through real
Dagster runs, real finalizer ticks and the real ``flowctl`` console script: the run fails
at resource initialization (Redis) or at its first ledger access (database) with a message
naming the setting and the fix, and no fragment of the password reaches the event log, the
run's failure text, the instance's files on disk, the ledger, asset metadata, logging or the
console. The pure side (every parser, ``redact_url``/``redact_text``) is in
``tests/unit/test_url_secrets.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from hypothesis import HealthCheck, example, given, settings

from devservers import free_port
from flow_assets.build import build_definitions
from flow_assets.dagster_names import COUNTERS_KEY, STORE_KEY
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.live.redis_counters import RedisCounters
from tests.flowkit import tick
from tests.unit.test_url_secrets import USER, assert_clean, passwords

FLOWCTL = Path(sys.executable).parent / "flowctl"
SECRET_VAR = "TEST_FLOW_SECRET_URL"  # not FLOW_*: the definitions load, the run meets it
RUN_SETTINGS = settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def secret_flow(data: Path) -> Flow:
    data.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(20)))
    return Flow(
        name="secret_orders",
        source=FileSource(str(data), page_size=10),
        key="id",
        handler=lambda batch: None,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )


def run_outputs(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Everything Dagster holds about the run, as text, by where it came from."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    seen = {
        "event log": "\n".join(str(record) for record in instance.all_logs(run_id)),
        "run tags": json.dumps(dict(run.tags)),
        "run config": json.dumps(run.run_config, default=str),
    }
    key = dg.AssetKey(["flows", "secret_orders"])
    seen["materializations"] = str(instance.fetch_materializations(key, limit=10).records)
    # Text files on disk (compute logs, ...); the SQLite storage is read through the APIs
    # above (its compressed blobs would match 3-letter windows by chance).
    for path in Path(instance.root_directory).rglob("*"):
        if path.is_file():
            try:
                seen[f"file {path}"] = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
    return seen


def failure_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """The messages of the run's failure events (step and run), with their error chains."""
    texts = []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not (event.is_step_failure or event.is_run_failure):
            continue
        texts.append(event.message or "")
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def assert_no_fragment(outputs: dict[str, str], *secrets: str) -> None:
    for where, text in outputs.items():
        try:
            assert_clean(text, *secrets)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None


def run_with_secret_url(
    url: str, variable: str, resources: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """Run the secret flow with ``url`` in ``SECRET_VAR`` (``variable`` unset), then tick the
    finalizer, which must fail to load the same resource: the run's failure text and every
    output channel of the run and the tick."""
    with tempfile.TemporaryDirectory() as home, pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_VAR, url)
        patch.delenv(variable, raising=False)
        flow = secret_flow(Path(home) / "orders.jsonl")
        defs = build_definitions([flow], resources=resources)
        with dg.instance_for_test(temp_dir=home) as instance:
            result = defs.resolve_job_def("secret_orders_job").execute_in_process(
                instance=instance, raise_on_error=False
            )
            assert not result.success
            with pytest.raises(Exception) as tick_error:  # the resource cannot load: any error
                tick(defs, instance)
            failure = failure_text(instance, result.run_id)
            outputs = run_outputs(instance, result.run_id)
    outputs["tick error"] = "".join(traceback.format_exception(tick_error.value))
    return failure, outputs


@RUN_SETTINGS
@given(user=USER, password=passwords())
@example(user="", password="qzxj/kvw")  # the report: '/' in a Redis password
@example(user="QZX", password="qzx@jkv#wqz")
@example(user="QZX", password="qzx?jkv%zzx")
def test_a_run_with_a_malformed_redis_url_fails_naming_the_fix_and_leaks_no_fragment(
    user: str,
    password: str,
    sqlite_url: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    url = f"redis://{user}:{password}@127.0.0.1:{free_port()}/0"
    resources = {
        STORE_KEY: MetricsStore(url=sqlite_url),
        COUNTERS_KEY: RedisCounters(url=dg.EnvVar(SECRET_VAR)),
    }
    failure, outputs = run_with_secret_url(url, "FLOW_REDIS_URL", resources)

    assert "FLOW_REDIS_URL / RedisCounters.url is not a valid Redis URL" in failure, failure
    assert "percent-encode reserved characters" in failure and "/ is %2F" in failure
    outputs["ledger"] = str(Ledger(url=sqlite_url).runs())
    captured = capfd.readouterr()
    outputs.update(stdout=captured.out, stderr=captured.err, logging=caplog.text)
    assert_no_fragment(outputs, user, password)


@RUN_SETTINGS
@given(user=USER, password=passwords())
@example(user="QZX", password="qzxj/kvw")
def test_a_run_with_a_malformed_database_url_fails_naming_the_fix_and_leaks_no_fragment(
    user: str,
    password: str,
    redis_url: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    url = f"postgresql+psycopg://{user}:{password}@127.0.0.1:{free_port()}/flows"
    store = MetricsStore(url=dg.EnvVar(SECRET_VAR), connect_retry_seconds=0.2)
    resources = {STORE_KEY: store, COUNTERS_KEY: RedisCounters(url=redis_url)}
    failure, outputs = run_with_secret_url(url, "FLOW_DATABASE_URL", resources)

    assert "MetricsStore `url` is not a valid database URL" in failure, failure
    assert "percent-encode reserved characters" in failure
    captured = capfd.readouterr()
    outputs.update(stdout=captured.out, stderr=captured.err, logging=caplog.text)
    assert_no_fragment(outputs, user, password)


def flowctl(args: list[str], **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "DAGSTER_"))}
    env.update(env_vars)
    return subprocess.run(
        [str(FLOWCTL), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("args", "variable", "url"),
    [
        (["status"], "FLOW_DATABASE_URL", "postgresql://QZX:qzxj/kvw@db.internal:5432/flows"),
        (["db", "current"], "FLOW_DATABASE_URL", "postgres://QZX:qzx@jkv@db.internal/flows"),
        (["run", "demo_customers"], "FLOW_REDIS_URL", "redis://:qzxj/kvw@cache.internal:6379/0"),
        (["cleanup"], "FLOW_REDIS_URL", "rediss://QZX:qzx#jkv%wqz@cache.internal:6380/0"),
    ],
)
def test_flowctl_fails_at_load_with_one_line_naming_the_variable(
    args: list[str], variable: str, url: str, tmp_path: Path
) -> None:
    env: dict[str, Any] = {"FLOW_HOME": str(tmp_path), variable: url}
    result = flowctl(args, **env)

    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {variable} is not a valid"), line
    assert "percent-encode reserved characters in the user name and password" in line
    assert_clean(result.stdout + result.stderr, url)
