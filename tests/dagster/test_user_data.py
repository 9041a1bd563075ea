"""No record data in what a run shows: a handler raising with an email, a phone number, an
SSN and a token in its message, through a real Dagster run, a real finalizer tick, a real
Redis and ledger. The personal data stays out of every output a user could see (captured
logging and console, Dagster's event log and storage on disk, run tags, the asset's
materializations and the ``flow_status`` check, the run's ``failure_reason``) and is kept
in the failed jobs' rows (``flowctl status --run``), the operator's chosen place. With
``Flow(error_detail="full")`` the step failure shows it too. A key function raising with a
record's data rejects the record without quoting it in the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from flow_assets.dispatch import JobBatch
from flow_assets.errors import FlowDefinitionError
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from resources.ledger.ledger import Ledger
from tests.dagster.test_security import ledger_outputs, visible_outputs
from tests.flowkit import assert_conserved, make_defs, row_of, run_flow, tick

EMAIL = "alice.liddell@example.com"
PHONE = "+1 555-867-5309"
SSN = "123-45-6789"
TOKEN = "tok_8f3a9c2e71b04d5f9a0b"
PERSONAL = (EMAIL, "555-867-5309", SSN, TOKEN)
MESSAGE = f"duplicate customer {EMAIL} phone {PHONE} ssn={SSN} session {TOKEN}"


def orders_file(tmp_path: Path) -> Path:
    path = tmp_path / "orders.jsonl"
    path.write_text("".join(json.dumps({"id": i, "email": EMAIL}) + "\n" for i in range(30)))
    return path


def raising_on_page_one(batch: JobBatch) -> None:
    if "15" in batch.keys:
        raise ValueError(MESSAGE)


def user_flow(tmp_path: Path, **options: Any) -> Flow:
    return Flow(
        name="customers",
        source=FileSource(str(orders_file(tmp_path)), page_size=10),
        key="id",
        handler=raising_on_page_one,
        pages_per_step=1,
        retry_policy=dg.RetryPolicy(max_retries=1),  # the retry's error is the same
        **options,
    )


def run_and_finalize(
    flow: Flow, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> str:
    defs = make_defs([flow], redis_url, database_url)
    result = run_flow(defs, flow.name, instance)
    tick(defs, instance)
    assert not result.success
    return result.run_id


def step_failures(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    events = [record.dagster_event for record in records]
    failures = [event.step_failure_data for event in events if event and event.step_failure_data]
    return [failure.error.to_string() for failure in failures if failure.error]


def test_a_handler_error_shows_its_class_and_a_masked_message_and_the_rows_keep_it_whole(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    instance: dg.DagsterInstance,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    run_id = run_and_finalize(user_flow(tmp_path), redis_url, database_url, instance)

    row = row_of(database_url, run_id)
    assert row.flow_status == "failed"
    assert_conserved(row)
    # The error's class and what it said, its personal data masked: still useful.
    reason = row.failure_reason or ""
    assert "ValueError: duplicate customer <email> phone <number> ssn=<number>" in reason
    assert "session <token>" in reason
    assert any("the handler raised ValueError: duplicate customer" in s for s in step_failures(
        instance, run_id
    ))  # fmt: skip

    # The operator's place keeps the whole error: the failed jobs' rows.
    failures = Ledger(url=database_url).job_failures(run_id)
    assert {f.record_key for f in failures} == {str(i) for i in range(10, 20)}
    assert all(f.error == f"ValueError: {MESSAGE}" for f in failures)

    outputs = visible_outputs(instance, [run_id], ["customers"])
    ledger = ledger_outputs(database_url, [run_id])
    outputs[f"flow_metrics {run_id}"] = ledger[f"flow_metrics {run_id}"]
    captured = capfd.readouterr()
    outputs.update(stdout=captured.out, stderr=captured.err, logging=caplog.text)
    assert "the handler raised ValueError" in caplog.text  # logged, masked
    assert_no_personal_data(outputs)


def test_with_error_detail_full_the_step_failure_shows_the_whole_message(
    tmp_path: Path, redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    flow = user_flow(tmp_path, error_detail="full")
    run_id = run_and_finalize(flow, redis_url, sqlite_url, instance)

    assert any(MESSAGE in text for text in step_failures(instance, run_id))
    assert MESSAGE in (row_of(sqlite_url, run_id).failure_reason or "")


def test_error_detail_takes_masked_or_full() -> None:
    assert Flow(
        name="x", source=FileSource("x.jsonl"), key="id", handler=lambda batch: None
    ).error_detail == "masked"  # fmt: skip
    with pytest.raises(FlowDefinitionError, match="error_detail='everything' is invalid"):
        Flow(
            name="x",
            source=FileSource("x.jsonl"),
            key="id",
            handler=lambda batch: None,
            error_detail="everything",
        )


def test_a_key_function_error_rejects_the_record_without_quoting_its_data(
    tmp_path: Path, redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    def key_of(record: Mapping[str, Any]) -> str:
        if record["id"] == 7:
            raise ValueError(f"no key for customer {record['email']} ssn={SSN}")
        return str(record["id"])

    flow = Flow(
        name="customers",
        source=FileSource(str(orders_file(tmp_path)), page_size=10),
        key=key_of,
        handler=lambda batch: None,
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, "customers", instance)
    tick(defs, instance)

    assert result.success
    row = row_of(sqlite_url, result.run_id)
    assert (row.flow_status, row.rejected_records) == ("partial_success", 1)
    [reject] = Ledger(url=sqlite_url).rejected_records(result.run_id)
    assert (
        reject.reason == "key function raised ValueError: no key for customer <email> ssn=<number>"
    )
    assert json.loads(reject.raw_record) == {"id": 7, "email": EMAIL}  # the record, kept


def assert_no_personal_data(outputs: dict[str, str]) -> None:
    leaks = {
        where: [item for item in PERSONAL if item in text]
        for where, text in outputs.items()
        if any(item in text for item in PERSONAL)
    }
    assert not leaks, f"personal data leaked into: {leaks}"
