"""Records no store can take, through real Dagster runs on both ledgers (SQLite and
PostgreSQL) and a real Redis: a key holding a lone surrogate (valid JSON, ``"\\ud800"``,
which UTF-8 and so Redis refuse) or a NUL (which PostgreSQL text refuses) is rejected into
quarantine with its reason, like any invalid record, and the run goes on. NUL and lone
surrogates elsewhere (a rejected record's other fields, a handler's error message) are
escaped where they are stored, so the quarantine and failure rows are written too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from tests.flowkit import (
    assert_conserved,
    assert_counts,
    make_defs,
    row_of,
    run_flow,
    run_keys_left,
    tick,
)

HOSTILE_KEYS: list[tuple[dict[str, Any], str]] = [
    ({"id": "\ud800"}, "a lone surrogate"),
    ({"id": "a\x00b"}, "a NUL character"),
    ({"id": "bad\udfff-tail", "n": 1}, "a lone surrogate"),
]
HOSTILE_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"no_id": "x\x00y"}, "record has no key field 'id'"),
    ({"no_id": "\udc80"}, "record has no key field 'id'"),
]
ODD_NOTE = {"id": "ok-odd-note", "note": "a\x00b\ud800"}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    # json.dumps escapes both (ASCII output): the file is valid UTF-8 JSON Lines.
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def hostile_file(tmp_path: Path) -> Path:
    records: list[Any] = [{"id": f"ok-{i}"} for i in range(20)]
    bad = [record for record, _ in HOSTILE_KEYS + HOSTILE_FIELDS] + [ODD_NOTE]
    for position, record in zip((1, 4, 9, 12, 17, 21), bad, strict=True):
        records.insert(position, record)
    return write_jsonl(tmp_path / "hostile.jsonl", records)


def fail_the_odd_note(batch: JobBatch) -> None:
    for key, record in batch.items():
        if key == ODD_NOTE["id"]:
            batch.fail(record, ValueError(f"cannot store note {record['note']}"))


def test_hostile_keys_are_quarantined_and_the_run_goes_on(
    tmp_path: Path, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    flow = Flow(
        name="hostile",
        source=FileSource(str(hostile_file(tmp_path)), page_size=10),
        key="id",
        handler=fail_the_odd_note,
        max_failed_jobs=1,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )
    defs = make_defs([flow], redis_url, database_url)
    result = run_flow(defs, "hostile", instance)
    tick(defs, instance)

    assert result.success
    row = row_of(database_url, result.run_id)
    assert row.flow_status == "partial_success"
    assert_counts(row, Counts(source=26, dispatched=21, rejected=5, completed=20, failed=1))
    assert_conserved(row)
    assert run_keys_left(redis_url) == []

    store = Ledger(url=database_url)
    rejects = store.rejected_records(result.run_id)
    expected = {json.dumps(record): reason for record, reason in HOSTILE_KEYS + HOSTILE_FIELDS}
    assert len(rejects) == len(expected)
    for reject in rejects:
        # The raw record is stored with the odd characters escaped, so it reads back as the
        # record the source sent; the reason says what is wrong with it.
        original = json.dumps(json.loads(reject.raw_record))
        assert original in expected, reject
        assert expected[original] in reject.reason, reject.reason
    [failure] = store.job_failures(result.run_id)
    assert failure.record_key == ODD_NOTE["id"]
    assert failure.error == "ValueError: cannot store note a\\u0000b\\ud800"


def test_a_handler_error_holding_nul_and_a_surrogate_is_stored_and_the_run_finalized(
    tmp_path: Path, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    def raising(batch: JobBatch) -> None:
        if "ok-12" in batch.keys:
            raise ValueError("upstream said \x00 and \udfff")

    source = write_jsonl(tmp_path / "ok.jsonl", [{"id": f"ok-{i}"} for i in range(20)])
    flow = Flow(
        name="odd_errors",
        source=FileSource(str(source), page_size=10),
        key="id",
        handler=raising,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )
    defs = make_defs([flow], redis_url, database_url)
    result = run_flow(defs, "odd_errors", instance)
    tick(defs, instance)

    assert not result.success
    row = row_of(database_url, result.run_id)
    assert row.flow_status == "failed"
    assert "ValueError: upstream said \\u0000 and \\udfff" in (row.failure_reason or "")
    assert_counts(row, Counts(source=20, dispatched=20, completed=10, failed=10))
    failures = Ledger(url=database_url).job_failures(result.run_id)
    assert {f.record_key for f in failures} == {f"ok-{i}" for i in range(10, 20)}
    assert {f.error for f in failures} == {"ValueError: upstream said \\u0000 and \\udfff"}
