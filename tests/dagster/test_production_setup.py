"""The configuration users take to production, for real: the Dagster instance on a real
PostgreSQL (dagster-postgres), the multiprocess executor with forkserver, real Redis, the
ledger on real PostgreSQL, finalized by a real sensor tick. Nothing is faked."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from resources.counts import Counts
from tests.dagster import production_flows
from tests.flowkit import assert_conserved, assert_counts, row_of, run_keys_left, status_tag, tick

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORDS = 1500
DUPLICATES = 60
NEGATIVE = 30  # failed jobs, within the flow's 5 % tolerance


def write_orders(path: Path) -> None:
    with path.open("w") as out:
        for i in range(RECORDS):
            amount = -5 if i % 50 == 7 else 100 + i
            out.write(json.dumps({"id": f"o{i}", "amount": amount}) + "\n")
        for i in range(DUPLICATES):
            out.write(json.dumps({"id": f"o{i * 3}", "amount": 1}) + "\n")


def test_multiprocess_run_on_a_postgres_instance_is_finalized_by_the_sensor(
    postgres_instance: dg.DagsterInstance,
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    assert "postgres" in type(postgres_instance.run_storage).__name__.lower()
    data = tmp_path / "orders.jsonl"
    write_orders(data)
    kwargs = {"database_url": postgres_url, "redis_url": redis_url, "data_path": str(data)}
    job = dg.build_reconstructable_job(
        "tests.dagster.production_flows",
        "build_job",
        reconstructable_kwargs=kwargs,
        # Step processes import this test's flow module as a deployment imports the user's.
        reconstructor_working_directory=str(REPO_ROOT),
    )
    run_config = {
        "execution": {
            "config": {"multiprocess": {"start_method": {"forkserver": {}}, "max_concurrent": 2}}
        }
    }
    with dg.execute_job(job, instance=postgres_instance, run_config=run_config) as result:
        assert result.success
        run_id = result.run_id
        step_pids = {
            event.pid
            for event in result.all_events
            if event.event_type == dg.DagsterEventType.STEP_START
        }
    assert len(step_pids) > 1  # steps really ran in separate processes

    defs = production_flows.build_definitions(**kwargs)
    tick(defs, postgres_instance)

    row = row_of(postgres_url, run_id)
    negative = sum(1 for i in range(RECORDS) if i % 50 == 7)
    assert negative == NEGATIVE
    assert row.flow_status == "partial_success"
    assert_counts(
        row,
        Counts(
            source=RECORDS + DUPLICATES,
            dispatched=RECORDS,
            skipped=DUPLICATES,
            completed=RECORDS - NEGATIVE,
            failed=NEGATIVE,
        ),
    )
    assert_conserved(row)
    assert run_keys_left(redis_url) == []
    assert status_tag(postgres_instance, run_id) == "partial_success"
