"""The incident end to end: a json-server-like API that sends its ``Link`` header only when
the request names a page, and ``X-Total-Count: 2500`` always. Real HTTP server, real
Dagster runs, real finalizer ticks, Redis and the ledger on the test's servers."""

from __future__ import annotations

from typing import Any

import dagster as dg

from flow_assets.flow import Flow
from flow_assets.sources import HeaderLinkPaginator, HttpJsonSource
from tests.flowkit import make_defs, row_of, run_flow, tick
from tests.services.test_reported_total import RECORDS, TOTAL, json_server


def link_flow(url: str, **source_options: Any) -> Flow:
    source = HttpJsonSource(url + "/items", paginator=HeaderLinkPaginator(), **source_options)
    return Flow(name="json_server_items", source=source, key="id", handler=lambda batch: None)


def test_a_short_read_is_recorded_against_the_total_and_fails_the_run(
    redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    with json_server(RECORDS) as api:
        defs = make_defs([link_flow(api.url)], redis_url, postgres_url)
        result = run_flow(defs, "json_server_items", instance)
        tick(defs, instance)
    row = row_of(postgres_url, result.run_id)
    assert (row.counts.source, row.source_reported_total) == (100, TOTAL)
    assert row.flow_status == "failed"
    assert f"reported {TOTAL} records but 100 were read" in (row.failure_reason or "")


def test_with_its_first_page_named_every_record_is_read(
    redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    with json_server(RECORDS) as api:
        flow = link_flow(api.url, params={"_page": 1, "_limit": 100})
        defs = make_defs([flow], redis_url, postgres_url)
        result = run_flow(defs, "json_server_items", instance)
        tick(defs, instance)
    row = row_of(postgres_url, result.run_id)
    assert (row.counts.source, row.counts.completed, row.source_reported_total) == (
        TOTAL,
        TOTAL,
        TOTAL,
    )
    assert row.flow_status == "completed"
