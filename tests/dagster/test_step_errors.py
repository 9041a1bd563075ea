"""What a failing step lets out, through real Dagster runs and finalizer ticks (real Redis, a
SQLite ledger, a closed port on 127.0.0.1): one message, secrets redacted and personal data
masked, and no chained exception behind it, since Dagster keeps an error's ``__cause__`` and
``__context__`` in its event log. The source below is the test's own: it raises what a driver
would (a message quoting a record, chained to another quoting more)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg

from devservers import free_port
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources import HttpJsonSource, JSONLinkPaginator
from flow_assets.sources.base import Page, PageRef
from tests.dagster.test_security import visible_outputs
from tests.flowkit import make_defs, row_of, run_flow, tick

SECRET = "S3CRET-client-xyz123"
EMAIL = "alice.liddell@example.com"


class DriverLikeSource:
    """One planned page whose fetch fails like a driver: quoting a record, chained."""

    def plan(self, partition_key: str | None) -> list[PageRef]:
        return [PageRef(0)]

    def fetch(self, ref: PageRef) -> Page:
        try:
            raise KeyError(f"row {EMAIL} ssn=123-45-6789")
        except KeyError as inner:
            raise RuntimeError(f"cannot decode the row of {EMAIL}") from inner

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        raise NotImplementedError


def ignore(batch: JobBatch) -> None:
    pass


def failures(instance: dg.DagsterInstance, run_id: str) -> list[Any]:
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return [r.dagster_event.step_failure_data.error for r in records if r.dagster_event]


def leaks(instance: dg.DagsterInstance, run_id: str, name: str, needle: str) -> list[str]:
    return [
        where
        for where, text in visible_outputs(instance, [run_id], [name]).items()
        if needle in text
    ]


def run(flow: Flow, instance: dg.DagsterInstance, redis_url: str, sqlite_url: str) -> str:
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, flow.name, instance)
    assert not result.success
    tick(defs, instance)
    assert row_of(sqlite_url, result.run_id).flow_status == "failed"
    return result.run_id


def test_a_query_secret_in_a_refused_connection_reaches_no_output(
    instance: dg.DagsterInstance, redis_url: str, sqlite_url: str
) -> None:
    """requests' error quotes the URL with its query; it stays out of the event log."""
    source = HttpJsonSource(
        f"http://127.0.0.1:{free_port()}/orders",
        paginator=JSONLinkPaginator(),
        params={"client_secret": SECRET},
        max_retries=0,
        records_path="items",
    )
    flow = Flow(
        name="refused",
        source=source,
        key="id",
        handler=ignore,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )
    run_id = run(flow, instance, redis_url, sqlite_url)
    assert leaks(instance, run_id, "refused", SECRET) == []
    messages = [(error.cause or error).message for error in failures(instance, run_id)]
    assert any("client_secret=***" in message for message in messages), messages


def test_a_foreign_error_leaves_the_step_masked_and_unchained(
    instance: dg.DagsterInstance, redis_url: str, sqlite_url: str
) -> None:
    flow = Flow(
        name="driverish",
        source=DriverLikeSource(),
        key="id",
        handler=ignore,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )
    run_id = run(flow, instance, redis_url, sqlite_url)
    assert leaks(instance, run_id, "driverish", EMAIL) == []
    assert leaks(instance, run_id, "driverish", "123-45-6789") == []
    errors = failures(instance, run_id)
    assert errors, "the step failed"
    ours = errors[0].cause or errors[0]  # Dagster wraps the step's error
    assert "RuntimeError: cannot decode the row of <email>" in ours.message
    assert ours.cause is None and ours.context is None
    assert "RuntimeError" in (row_of(sqlite_url, run_id).failure_reason or "")


def test_with_error_detail_full_the_message_is_whole_but_still_unchained(
    instance: dg.DagsterInstance, redis_url: str, sqlite_url: str
) -> None:
    flow = Flow(
        name="driverish_full",
        source=DriverLikeSource(),
        key="id",
        handler=ignore,
        retry_policy=dg.RetryPolicy(max_retries=0),
        error_detail="full",
    )
    run_id = run(flow, instance, redis_url, sqlite_url)
    ours = failures(instance, run_id)[0]
    ours = ours.cause or ours
    assert f"cannot decode the row of {EMAIL}" in ours.message
    assert ours.cause is None and "123-45-6789" not in ours.to_string()
