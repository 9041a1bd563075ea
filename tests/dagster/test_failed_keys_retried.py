"""dedup="flow" releases the keys of failed jobs when their run is final, so the next run
dispatches exactly those records again (``keep_failed_keys=True`` keeps them claimed).

Real Dagster runs (in-process), real finalizer sensor ticks, real Redis and
PostgreSQL/SQLite; the release itself is also checked directly against the ledger."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger import db, job_queries
from resources.ledger.ledger import Ledger
from resources.ledger.records import FinalState, JobFailure, PageRecord
from resources.run_policy import RunPolicy
from tests.dagster import settle_flows
from tests.dagster.settle_flows import handled_keys, write_jsonl
from tests.flowkit import assert_conserved, assert_counts, make_defs, row_of, run_flow, tick
from tests.ledger_helpers import release_failed_keys

FLOW = "retry_orders"
IDS = [f"o{n:03d}" for n in range(120)]  # 6 pages of 20, 2 pages a step
REFUSED = ["o007", "o050", "o111"]  # their jobs fail (batch.fail) while `broken` exists
DOWN_PAGE = IDS[60:80]  # page 3: o065 makes the handler raise while `down` exists


def orders(broken: Path, down: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for key in IDS:
        record: dict[str, Any] = {"id": key}
        if key in REFUSED:
            record["fail_while"] = str(broken)
        if key == "o065":
            record["raise_while"] = str(down)
        records.append(record)
    return records


@pytest.mark.parametrize("keep_failed_keys", [False, True], ids=["default", "keep_failed_keys"])
def test_the_next_run_dispatches_exactly_the_failed_records_again(
    keep_failed_keys: bool,
    database_url: str,
    redis_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run 1: three jobs fail (the handler reports them failed) and the page holding o065
    fails whole (the handler raises on the step's last attempt): 23 failed jobs, the run
    ``failed``. Downstream is back for run 2 of the same records: by default it dispatches
    exactly those 23 (and run 3 none); with keep_failed_keys=True it dispatches none."""
    broken, down, handled = tmp_path / "broken", tmp_path / "down", tmp_path / "handled.txt"
    broken.touch()
    down.touch()
    monkeypatch.setenv("FLOW_TEST_HANDLED", str(handled))
    flow = Flow(
        name=FLOW,
        source=FileSource(
            str(write_jsonl(orders(broken, down), tmp_path / "o.jsonl")), page_size=20
        ),
        key="id",
        handler=settle_flows.handle,
        pages_per_step=2,
        retry_policy=dg.RetryPolicy(max_retries=0),
        dedup="flow",
        keep_failed_keys=keep_failed_keys,
    )
    defs = make_defs([flow], redis_url, database_url)
    failed_keys = sorted(REFUSED + DOWN_PAGE)

    first = run_flow(defs, FLOW, instance)
    assert not first.success  # the page holding o065 raised on its last attempt
    tick(defs, instance)
    row = row_of(database_url, first.run_id)
    assert row.flow_status == "failed"
    assert_counts(row, Counts(source=120, dispatched=120, completed=97, failed=23))
    store = Ledger(url=database_url)
    assert sorted(f.record_key for f in store.job_failures(first.run_id, 1000)) == failed_keys
    assert sorted(handled_keys(handled)) == sorted(set(IDS) - set(DOWN_PAGE))

    broken.unlink()
    down.unlink()
    handled.unlink()
    second = run_flow(defs, FLOW, instance)
    assert second.success
    tick(defs, instance)
    row = row_of(database_url, second.run_id)
    assert_conserved(row)
    if keep_failed_keys:
        assert_counts(row, Counts(source=120, dispatched=0, skipped=120))
        assert handled_keys(handled) == []
        return
    assert_counts(row, Counts(source=120, dispatched=23, skipped=97, completed=23))
    assert sorted(handled_keys(handled)) == failed_keys
    assert row.flow_status == "partial_success"

    third = run_flow(defs, FLOW, instance)
    tick(defs, instance)
    assert_counts(row_of(database_url, third.run_id), Counts(120, 0, skipped=120))


# ------------------------------------------------------------ the release, directly


def _start(store: Ledger, run_id: str, **policy: Any) -> None:
    settings: dict[str, Any] = {"dedup": "flow", **policy}
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc), RunPolicy(**settings))


def _finalize(store: Ledger, run_id: str, *, awaiting: bool = False) -> None:
    totals = store.page_totals([run_id])[run_id]
    counts = totals.counts
    final = FinalState(
        run_id,
        "failed",
        Counts(*counts.as_tuple()[:5], counts.failed + counts.pending),
        totals.pages_done,
        datetime.now(timezone.utc),
        "test",
        awaiting_dagster=awaiting,
    )
    assert store.finalize_many([final]) == [run_id]


def _ledger_run(store: Ledger, run_id: str, **policy: Any) -> dict[str, list[str]]:
    """A run in the ledger with every kind of job outcome; its keys by outcome.

    Page 0 inline done: a0 completed, a1 failed. Page 1 inline never finished (its step
    died): b0, b1 pending. Page 2 on workers: c0 completed, c1 failed, c2 pending.
    """
    _start(store, run_id, **policy)
    pages = {0: ["a0", "a1"], 1: ["b0", "b1"], 2: ["c0", "c1", "c2"]}
    for index, keys in pages.items():
        assert store.claim_flow_keys(FLOW, run_id, index, keys) == [True] * len(keys)
    store.record_pages(
        run_id,
        [
            PageRecord(0, Counts(2, 2), "dispatched", pages[0]),
            PageRecord(1, Counts(2, 2), "dispatched", pages[1]),
        ],
    )
    done = PageRecord(
        0, Counts(2, 2, completed=1, failed=1), "done", pages[0], failures=[JobFailure("a1", "x")]
    )
    store.finish_pages(run_id, [done])
    job_ids = {key: f"{FLOW}-{run_id}-p2-j{n}" for n, key in enumerate(pages[2])}
    store.record_async_page(run_id, PageRecord(2, Counts(3, 3), "dispatched", pages[2]), job_ids)
    with db.transaction(store.engine(), write=True, retry_seconds=5) as conn:
        job_queries.ack_jobs(conn, run_id, ["c0"], {"c1": "refused"}, datetime.now(timezone.utc))
    return {"completed": ["a0", "c0"], "failed": ["a1", "b0", "b1", "c1", "c2"]}


def _claimable(store: Ledger, keys: list[str]) -> list[str]:
    """The keys a new run of the flow would dispatch (claimed by it, as a real run would)."""
    probe = f"probe-{len(keys)}-{datetime.now(timezone.utc).timestamp()}"
    _start(store, probe)
    flags = store.claim_flow_keys(FLOW, probe, 0, keys)
    return [key for key, mine in zip(keys, flags, strict=True) if mine]


def test_release_frees_exactly_the_failed_and_lost_keys_once(store: Ledger) -> None:
    keys = _ledger_run(store, "run-a")
    everything = sorted(keys["completed"] + keys["failed"])
    assert release_failed_keys(store, ["run-a"]) == 0  # still running: nothing to release

    _finalize(store, "run-a")  # the final write releases them in its own transaction
    assert release_failed_keys(store, ["run-a"]) == 0  # idempotent
    assert _claimable(store, ["a1", "b0"]) == ["a1", "b0"]  # another run claims two of them
    assert release_failed_keys(store, ["run-a"]) == 0  # and keeps them
    assert _claimable(store, everything) == ["b1", "c1", "c2"]


@pytest.mark.parametrize(
    "policy",
    [{"dedup": "run"}, {"keep_failed_keys": True}],
    ids=["dedup-run", "keep_failed_keys"],
)
def test_release_leaves_runs_whose_policy_keeps_their_keys(
    store: Ledger, policy: dict[str, Any]
) -> None:
    _ledger_run(store, "run-k", **policy)
    _finalize(store, "run-k")
    assert release_failed_keys(store, ["run-k"]) == 0


def test_a_stalled_run_whose_dagster_run_still_works_keeps_its_keys_until_it_ends(
    store: Ledger,
) -> None:
    """Decided while its steps may still finish pages (awaiting Dagster): nothing is
    released yet; once its Dagster run ended the run is decided again, and released then."""
    keys = _ledger_run(store, "run-w")
    everything = sorted(keys["completed"] + keys["failed"])
    _finalize(store, "run-w", awaiting=True)
    assert release_failed_keys(store, ["run-w"]) == 0
    assert _claimable(store, everything) == []  # nothing released while steps may write
    # Its Dagster run ended: the finalizer reopens the run and decides it again.
    assert store.reopen("run-w")
    _finalize(store, "run-w")
    assert len(_claimable(store, everything)) == 5
