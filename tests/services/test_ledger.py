"""Ledger on real SQLite files and a real PostgreSQL server (tests/conftest.py); no fakes."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from devservers import PostgresServer, free_port
from resources.counts import Counts
from resources.errors import ConfigurationError, RunFinalError, StoreUnavailableError
from resources.ledger import db, run_queries
from resources.ledger.ledger import Ledger
from resources.ledger.page_queries import MAX_RAW_RECORD_BYTES
from resources.ledger.records import FinalState, JobFailure, PageRecord, PageTotals, RejectedRecord
from tests.ledger_helpers import finalize, finish_page

pytestmark = pytest.mark.services

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=timezone.utc)
PASSWORD = "hunter2-s3cret"


def _page(index: int, counts: Counts, status: str = "done", **kwargs: object) -> PageRecord:
    keys = kwargs.pop("keys", [f"p{index}-k{i}" for i in range(counts.dispatched)])
    return PageRecord(index, counts, status, keys, **kwargs)  # type: ignore[arg-type]


def test_start_run_twice_changes_nothing(store: Ledger) -> None:
    store.start_run("run-1", "orders", "2025-01-06", T0)
    store.start_run("run-1", "other_flow", None, T0 + timedelta(hours=1))

    [row] = store.runs(run_id="run-1")
    assert (row.flow_name, row.partition_key, row.flow_status) == (
        "orders",
        "2025-01-06",
        "running",
    )
    assert row.started_at == T0
    assert row.counts == Counts()


def test_timestamps_come_back_as_the_same_instant_in_utc(store: Ledger) -> None:
    plus_two = timezone(timedelta(hours=2))
    store.start_run("run-1", "orders", None, datetime(2025, 1, 6, 14, 0, tzinfo=plus_two))

    [row] = store.runs()
    assert row.started_at == T0
    assert row.started_at.tzinfo == timezone.utc
    assert row.as_dict()["started_at"] == "2025-01-06T12:00:00+00:00"
    with pytest.raises(ValueError, match="naive"):
        store.start_run("run-2", "orders", None, datetime(2025, 1, 6))


def test_a_page_recorded_twice_counts_once_and_its_rejects_and_failures_are_replaced(
    store: Ledger,
) -> None:
    store.start_run("run-1", "orders", None, T0)
    first = _page(
        0,
        Counts(source=5, dispatched=3, skipped=0, rejected=2, completed=1, failed=1),
        status="dispatched",
        rejects=[RejectedRecord(1, "missing id", {"n": 1}), RejectedRecord(4, "bad", "raw")],
        failures=[JobFailure("k-a", "timeout")],
    )
    retry = _page(
        0,
        Counts(source=5, dispatched=4, skipped=0, rejected=1, completed=3, failed=1),
        rejects=[RejectedRecord(4, "bad date", "raw-4")],
        failures=[JobFailure("k-b", "HTTP 500")],
    )
    store.record_pages("run-1", [first])
    store.record_pages("run-1", [retry])
    store.record_pages("run-1", [retry])

    totals = store.page_totals(["run-1"])["run-1"]
    assert totals == PageTotals(retry.counts, pages_done=1, pages_seen=1)
    rejects = store.rejected_records("run-1")
    assert [(r.page_index, r.position, r.reason, r.raw_record) for r in rejects] == [
        (0, 4, "bad date", "raw-4")
    ]
    assert [(f.record_key, f.error) for f in store.job_failures("run-1")] == [("k-b", "HTTP 500")]


def test_finish_page_updates_the_pre_written_page_only(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    pending = Counts(source=4, dispatched=3, rejected=1)
    rejects = [RejectedRecord(2, "missing id", {"n": 2})]
    store.record_pages("run-1", [_page(0, pending, "dispatched", rejects=rejects)])
    done = _page(
        0,
        Counts(source=4, dispatched=3, rejected=1, completed=2, failed=1),
        rejects=rejects,
        failures=[JobFailure("p0-k1", "HTTP 500")],
    )
    finish_page(store, "run-1", done)

    totals = store.page_totals(["run-1"])["run-1"]
    assert totals == PageTotals(done.counts, pages_done=1, pages_seen=1)
    assert store.claimed_keys("run-1") == {"p0-k0": 0, "p0-k1": 0, "p0-k2": 0}
    assert [r.reason for r in store.rejected_records("run-1")] == ["missing id"]
    assert [(f.record_key, f.error) for f in store.job_failures("run-1")] == [("p0-k1", "HTTP 500")]
    with pytest.raises(ValueError, match=r"pages \[1\] of run 'run-1' were not recorded"):
        finish_page(store, "run-1", _page(1, Counts(source=1, dispatched=1, completed=1)))


def test_finish_pages_records_a_steps_pages_at_once_or_none_of_them(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    store.record_pages(
        "run-1", [_page(n, Counts(source=2, dispatched=2), "dispatched") for n in (0, 1)]
    )
    done = [
        _page(0, Counts(source=2, dispatched=2, completed=2)),
        _page(
            1,
            Counts(source=2, dispatched=2, completed=1, failed=1),
            failures=[JobFailure("p1-k0", "HTTP 500")],
        ),
    ]
    unknown = _page(7, Counts(source=1, dispatched=1, completed=1))

    with pytest.raises(ValueError, match=r"pages \[7\] of run 'run-1' were not recorded"):
        store.finish_pages("run-1", [*done, unknown])
    assert store.page_totals(["run-1"])["run-1"].pages_done == 0  # nothing written
    store.finish_pages("run-1", done)

    totals = store.page_totals(["run-1"])["run-1"]
    assert totals == PageTotals(Counts(4, 4, 0, 0, 3, 1), pages_done=2, pages_seen=2)
    assert [(f.record_key, f.page_index) for f in store.job_failures("run-1")] == [("p1-k0", 1)]


def test_page_totals_sum_pages_per_run_and_give_zeros_to_runs_without_pages(
    store: Ledger,
) -> None:
    for run_id in ("run-a", "run-b", "run-empty"):
        store.start_run(run_id, "orders", None, T0)
    store.record_pages(
        "run-a",
        [
            _page(0, Counts(source=3, dispatched=3, completed=3)),
            _page(1, Counts(source=2, dispatched=1, skipped=1, completed=0), status="dispatched"),
            _page(2, Counts(source=4, dispatched=2, rejected=2, completed=1, failed=1)),
        ],
    )
    store.record_pages("run-b", [_page(7, Counts(source=1, dispatched=1, failed=1))])

    totals = store.page_totals(["run-a", "run-b", "run-empty"])

    assert totals["run-a"] == PageTotals(
        Counts(source=9, dispatched=6, skipped=1, rejected=2, completed=4, failed=1),
        pages_done=2,
        pages_seen=3,
    )
    assert totals["run-b"] == PageTotals(Counts(1, 1, 0, 0, 0, 1), pages_done=1, pages_seen=1)
    assert totals["run-empty"] == PageTotals(Counts(), pages_done=0, pages_seen=0)


def test_claimed_keys_and_page_counts_are_enough_to_rebuild_a_run(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    pages = [
        _page(0, Counts(source=2, dispatched=2, completed=2), keys=["a", "b"]),
        _page(1, Counts(source=2, dispatched=1, skipped=1), "dispatched", keys=["c"]),
    ]
    store.record_pages("run-1", pages)

    assert store.claimed_keys("run-1") == {"a": 0, "b": 0, "c": 1}
    assert store.page_counts("run-1") == {0: pages[0].counts, 1: pages[1].counts}
    assert store.claimed_keys("unknown-run") == {}


def test_the_ledger_gives_a_key_to_the_first_page_that_records_it(store: Ledger) -> None:
    """Redis lost the run (noted), so it gave key b to pages 0 and 1: page 0, recorded
    first, owns it; page 1 is recorded without it (skipped), now and on every retry."""
    store.start_run("run-1", "orders", None, T0)
    assert store.note_counter_mismatch("run-1", "Redis lost the run")
    first = _page(0, Counts(source=2, dispatched=2), "dispatched", keys=["a", "b"])
    second = _page(1, Counts(source=3, dispatched=2, skipped=1), "dispatched", keys=["b", "c"])
    assert store.record_pages("run-1", [first]) == [first]

    [narrowed] = store.record_pages("run-1", [second])

    assert narrowed == _page(1, Counts(source=3, dispatched=1, skipped=2), "dispatched", keys=["c"])
    assert store.record_pages("run-1", [second, first]) == [narrowed, first]  # retries
    assert store.claimed_keys("run-1") == {"a": 0, "b": 0, "c": 1}
    assert store.page_counts("run-1") == {0: first.counts, 1: narrowed.counts}
    # Within one call the first page given keeps a key; a page left with no job is done.
    late = [
        _page(3, Counts(source=1, dispatched=1), "dispatched", keys=["d"]),
        _page(2, Counts(source=2, dispatched=2), "dispatched", keys=["d", "a"]),
    ]
    assert store.record_pages("run-1", late) == [
        late[0],
        _page(2, Counts(source=2, skipped=2), "done", keys=[]),
    ]
    # A page reporting outcomes of keys another page owns is refused, and nothing written.
    with pytest.raises(ValueError, match=r"page 4 reports outcomes of keys other pages own"):
        store.record_pages(
            "run-1",
            [
                _page(5, Counts(source=1, dispatched=1), "dispatched", keys=["e"]),
                _page(4, Counts(source=1, dispatched=1, completed=1), keys=["c"]),
            ],
        )
    assert "e" not in store.claimed_keys("run-1")
    # dispatch="rq": only the jobs of keys the page owns are registered.
    async_page = _page(6, Counts(source=2, dispatched=2), "dispatched", keys=["c", "f"])
    recorded, pending = store.record_async_page("run-1", async_page, {"c": "j0", "f": "j0"})
    assert (recorded.claimed_keys, recorded.counts.skipped, pending) == (["f"], 1, {"f"})


def test_a_key_the_ledger_gave_a_page_stays_its_own_in_a_rebuild(store: Ledger) -> None:
    """Found by the deep model test (seed 319918886): after a loss, page 2 claimed g in the
    ledger; a retry of page 2 that Redis refused g (a stale Redis said page 4 had it) left
    g on no page row. A rebuild from the ledger must still give g to page 2 (which owns it
    in flow_run_keys), or Redis hands it to page 4, the ledger refuses it there, and g ends
    up dispatched by no page while counted skipped twice."""
    store.start_run("run-1", "orders", None, T0)
    assert store.note_counter_mismatch("run-1", "Redis lost the run")
    owner = _page(2, Counts(source=2, dispatched=2), "dispatched", keys=["f", "g"])
    refused = _page(2, Counts(source=2, dispatched=1, skipped=1), "dispatched", keys=["f"])
    store.record_pages("run-1", [owner])
    store.record_pages("run-1", [refused])

    assert store.claimed_keys("run-1") == {"f": 2, "g": 2}
    stale = _page(4, Counts(source=1, dispatched=1), "dispatched", keys=["g"])
    assert store.record_pages("run-1", [stale])[0].claimed_keys == []


def test_while_redis_held_the_run_pages_are_recorded_as_given(store: Ledger) -> None:
    """Before any loss Redis alone decides (no two pages get a key): no key table rows."""
    store.start_run("run-1", "orders", None, T0)
    pages = [_page(n, Counts(source=1, dispatched=1), "dispatched", keys=["k"]) for n in (0, 1)]
    assert store.record_pages("run-1", pages) == pages
    with store.engine().connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM flow_run_keys")).scalar_one() == 0


def test_a_steps_claims_go_in_one_statement_beyond_the_bound_parameter_limit(
    store: Ledger,
) -> None:
    store.start_run("run-1", "orders", None, T0)
    store.note_counter_mismatch("run-1", "Redis lost the run")
    pages = [
        _page(n, Counts(source=5000, dispatched=5000), "dispatched", keys=[f"k{i}" for i in keys])
        for n, keys in enumerate((range(5000), range(4000, 9000), range(9000, 14000)))
    ]
    recorded = store.record_pages("run-1", pages)
    assert [page.counts.dispatched for page in recorded] == [5000, 4000, 5000]
    assert len(store.claimed_keys("run-1")) == 14000


def test_record_pages_rejects_inconsistent_pages_and_unknown_runs(store: Ledger) -> None:
    with pytest.raises(ValueError, match="source=3 != dispatched=1"):
        _page(0, Counts(source=3, dispatched=1))
    with pytest.raises(ValueError, match="still pending"):
        _page(0, Counts(source=1, dispatched=1), status="done")
    with pytest.raises(ValueError, match="start_run"):
        store.record_pages("never-started", [_page(0, Counts(source=1, dispatched=1, completed=1))])


def test_quarantine_keeps_large_and_odd_records_truncated_with_a_marker(
    store: Ledger,
) -> None:
    store.start_run("run-1", "orders", None, T0)
    huge = "é" * MAX_RAW_RECORD_BYTES  # 2 bytes each in UTF-8: twice the limit
    rejects = [
        RejectedRecord(0, "too big", huge),
        RejectedRecord(1, "nul byte", "a\x00b"),
        RejectedRecord(2, "not a string", {"id": None, "tags": ["x"]}),
    ]
    store.record_pages("run-1", [_page(0, Counts(source=3, rejected=3), rejects=rejects)])

    big, nul, obj = store.rejected_records("run-1")
    assert len(big.raw_record.encode("utf-8")) <= MAX_RAW_RECORD_BYTES
    assert big.raw_record.startswith("éé")
    assert big.raw_record.endswith(f"[truncated {2 * MAX_RAW_RECORD_BYTES} bytes to 65536]")
    assert nul.raw_record == "a\\u0000b"
    assert json.loads(obj.raw_record) == {"id": None, "tags": ["x"]}


def test_finalize_is_a_compare_and_set(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    final = Counts(source=4, dispatched=3, skipped=1, completed=3)

    won = finalize(
        store,
        "run-1",
        status="partial_success",
        counts=final,
        pages_done=2,
        finished_at=T0 + timedelta(seconds=90),
        failure_reason="1 duplicate skipped",
        counter_mismatch="redis source=5, ledger source=4",
    )
    again = finalize(
        store,
        "run-1",
        status="failed",
        counts=Counts(),
        pages_done=0,
        finished_at=T0 + timedelta(hours=1),
    )

    assert (won, again) == (True, False)
    [row] = store.runs(run_id="run-1")
    assert row.flow_status == "partial_success"
    assert row.counts == final
    assert (row.pages_done, row.total_runtime_ms) == (2, 90_000)
    assert row.finished_at == T0 + timedelta(seconds=90)
    assert row.failure_reason == "1 duplicate skipped"
    assert row.counter_mismatch == "redis source=5, ledger source=4"
    assert (
        finalize(
            store, "no-such-run", status="failed", counts=Counts(), pages_done=0, finished_at=T0
        )
        is False
    )
    with pytest.raises(ValueError, match="not final"):
        finalize(store, "run-1", status="running", counts=Counts(), pages_done=0, finished_at=T0)


def test_concurrent_finalizers_write_one_final_state(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    store.running_runs(1)  # migrate before the race, so the threads only race to finalize
    statuses = ["completed", "failed", "cancelled", "partial_success"] * 2
    barrier = threading.Barrier(len(statuses))
    results: dict[str, bool] = {}

    def race(status: str, n: int) -> None:
        barrier.wait()
        results[f"{status}-{n}"] = finalize(
            store, "run-1", status=status, counts=Counts(), pages_done=0, finished_at=T0
        )

    threads = [threading.Thread(target=race, args=(s, n)) for n, s in enumerate(statuses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)  # a hang guard, not a timing assertion
    assert not any(thread.is_alive() for thread in threads)

    winners = [name for name, won in results.items() if won]
    assert len(results) == len(statuses)
    assert len(winners) == 1
    [row] = store.runs(run_id="run-1")
    assert winners[0].startswith(row.flow_status)


def test_finalize_many_writes_only_running_runs_in_one_call(store: Ledger) -> None:
    for n in range(3):
        store.start_run(f"run-{n}", "orders", None, T0)
    finalize(store, "run-1", status="failed", counts=Counts(), pages_done=0, finished_at=T0)
    finals = [
        FinalState(
            f"run-{n}",
            "completed",
            Counts(source=n, dispatched=n, completed=n),
            1,
            T0 + timedelta(seconds=n),
            failure_reason=None,
        )
        for n in range(3)
    ] + [FinalState("no-such-run", "completed", Counts(), 0, T0)]

    assert sorted(store.finalize_many(finals)) == ["run-0", "run-2"]
    rows = {row.run_id: row for row in store.runs()}
    assert rows["run-1"].flow_status == "failed"  # already final: left alone
    assert rows["run-2"].counts == Counts(source=2, dispatched=2, completed=2)
    assert (rows["run-2"].total_runtime_ms, rows["run-2"].pages_done) == (2000, 1)
    assert store.finalize_many([]) == []
    with pytest.raises(ValueError, match="run 'run-0': status 'running' is not final"):
        store.finalize_many([FinalState("run-0", "running", Counts(), 0, T0)])


def test_concurrent_batch_finalizers_give_each_run_one_winner(
    store: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_queries, "IN_LIST_SIZE", 8)  # several lock batches per call
    run_ids = [f"run-{n}" for n in range(40)]
    for run_id in run_ids:
        store.start_run(run_id, "orders", None, T0)
    store.running_runs(1)
    barrier = threading.Barrier(2)
    won: dict[str, list[str]] = {}

    def finalize(status: str, order: list[str]) -> None:
        barrier.wait()
        won[status] = store.finalize_many(
            [FinalState(run_id, status, Counts(), 0, T0) for run_id in order]
        )

    # Opposite orders and several chunks: unless every call locks runs in one global
    # order, the two deadlock (PostgreSQL aborts one) or both win a run.
    threads = [
        threading.Thread(target=finalize, args=("completed", run_ids)),
        threading.Thread(target=finalize, args=("failed", run_ids[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)  # a hang guard, not a timing assertion
    assert not any(thread.is_alive() for thread in threads)

    assert sorted(won["completed"] + won["failed"]) == sorted(run_ids)
    rows = {row.run_id: row.flow_status for row in store.runs(limit=100)}
    assert all(rows[run_id] == "completed" for run_id in won["completed"])
    assert all(rows[run_id] == "failed" for run_id in won["failed"])


def test_running_runs_oldest_progress_first_with_limit(store: Ledger) -> None:
    for n in range(4):
        store.start_run(f"run-{n}", "orders", None, T0 + timedelta(minutes=n))
    # Progress on run-0 makes it the most recently updated one.
    store.record_pages("run-0", [_page(0, Counts(source=1, dispatched=1), "dispatched")])
    finalize(store, "run-2", status="completed", counts=Counts(), pages_done=0, finished_at=T0)

    assert [r.run_id for r in store.running_runs(10)] == ["run-1", "run-3", "run-0"]
    assert [r.run_id for r in store.running_runs(2)] == ["run-1", "run-3"]


def test_unpublished_runs_until_marked_published(store: Ledger) -> None:
    for n in range(3):
        store.start_run(f"run-{n}", "orders", None, T0)
    for n in (1, 0):
        finalize(
            store,
            f"run-{n}",
            status="completed",
            counts=Counts(),
            pages_done=0,
            finished_at=T0 + timedelta(minutes=n),
        )

    unpublished = store.unpublished_runs(10)
    assert [r.run_id for r in unpublished] == ["run-0", "run-1"]
    [running] = store.runs(run_id="run-2")
    at = T0 + timedelta(hours=1)
    assert store.mark_published([unpublished[0], running], at) == ["run-0"]
    assert [r.run_id for r in store.unpublished_runs(10)] == ["run-1"]
    [row] = store.runs(run_id="run-0")
    assert row.published_at == at


def test_a_row_finalized_again_since_it_was_read_is_not_marked_published(store: Ledger) -> None:
    """The publisher read revision 1; a re-execution reopened the run and a finalizer wrote
    revision 2 before the mark: revision 2 was never published, so it stays unpublished."""
    store.start_run("run-0", "orders", None, T0)
    finish = {"status": "failed", "counts": Counts(), "pages_done": 0, "finished_at": T0}
    assert finalize(store, "run-0", **finish)  # type: ignore[arg-type]
    [read] = store.unpublished_runs(10)
    assert store.reopen("run-0")
    assert finalize(store, "run-0", **finish)  # type: ignore[arg-type]

    assert store.statuses(["run-0", "nope"]) == {"run-0": ("failed", 2)}
    assert store.mark_published([read], T0) == []
    [again] = store.unpublished_runs(10)
    assert again.revision == 2
    assert store.mark_published([again], T0) == ["run-0"]


def test_runs_newest_first_filtered_by_flow(store: Ledger) -> None:
    for n, flow in enumerate(["orders", "users", "orders"]):
        store.start_run(f"run-{n}", flow, None, T0 + timedelta(minutes=n))

    assert [r.run_id for r in store.runs()] == ["run-2", "run-1", "run-0"]
    assert [r.run_id for r in store.runs(flow_name="orders", limit=1)] == ["run-2"]
    assert store.runs(run_id="nope") == []


def test_the_plan_is_recorded_and_missing_pages_are_named(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    assert store.missing_pages("run-1") is None  # no plan yet: nothing is proven

    store.record_plan("run-1", pages_total=3, reported_total=250)
    store.record_pages("run-1", [PageRecord(1, Counts(), "done", [])])

    [row] = store.runs(run_id="run-1")
    assert (row.pages_total, row.source_reported_total, row.extraction_done) == (3, 250, False)
    assert row.updated_at > T0
    assert store.missing_pages("run-1") == [0, 2]
    store.mark_extraction_done("run-1")  # collect's hint, not a proof
    assert store.runs(run_id="run-1")[0].extraction_done
    with pytest.raises(ValueError, match="start_run"):
        store.record_plan("never-started", pages_total=1, reported_total=None)


def test_finalizer_queries_can_use_the_partial_indexes(store: Ledger) -> None:
    store.start_run("run-1", "orders", None, T0)
    running = "SELECT run_id FROM flow_metrics WHERE flow_status = 'running' ORDER BY updated_at"
    unpublished = (
        "SELECT run_id FROM flow_metrics WHERE published_at IS NULL"
        " AND flow_status <> 'running' ORDER BY finished_at"
    )
    with store.engine().connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")  # tiny table: force the choice
            explain = "EXPLAIN "
        else:
            explain = "EXPLAIN QUERY PLAN "
        plans = [
            " ".join(str(value) for row in conn.execute(text(explain + sql)) for value in row)
            for sql in (running, unpublished)
        ]
    assert "ix_flow_metrics_running" in plans[0]
    assert "ix_flow_metrics_unpublished" in plans[1]


def test_auto_migrate_off_on_an_empty_database_asks_for_flowctl_db_upgrade(
    database_url: str,
) -> None:
    store = Ledger(url=database_url, auto_migrate=False)

    with pytest.raises(ConfigurationError, match="flowctl db upgrade"):
        store.runs()
    assert store.current_revision() is None

    store.upgrade()
    assert store.runs() == []


@pytest.mark.parametrize(
    "bad_url",
    [
        f"mysql+pymysql://app:{PASSWORD}@db:3306/flows",
        f"postgresql+asyncpg://app:{PASSWORD}@db/flows",
        f"postgresql://app:{PASSWORD}@db:notaport/flows",
        "sqlite://",
        "not a url at all",
    ],
)
def test_a_bad_url_is_a_configuration_error_without_the_password(
    bad_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOW_DATABASE_URL", bad_url)

    with pytest.raises(ConfigurationError) as raised:
        Ledger().runs()

    message = str(raised.value)
    assert "FLOW_DATABASE_URL" in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(raised.value.__cause__)


def test_url_defaults_to_sqlite_in_flow_home_and_postgresql_means_psycopg3(
    flow_home: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOW_DATABASE_URL", raising=False)
    assert Ledger().resolved_url() == f"sqlite:///{flow_home}/flow_metrics.db"

    monkeypatch.setenv("FLOW_DATABASE_URL", f"postgresql://app:{PASSWORD}@db:5432/flows")
    store = Ledger()
    assert store.resolved_url() == f"postgresql+psycopg://app:{PASSWORD}@db:5432/flows"
    assert store.redacted_url() == "postgresql+psycopg://app:***@db:5432/flows"


def test_an_unreachable_server_raises_store_unavailable_without_the_password() -> None:
    url = f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:{free_port()}/flows"
    store = Ledger(url=url, connect_retry_seconds=0.5)

    with pytest.raises(StoreUnavailableError) as raised:
        store.start_run("run-1", "orders", None, T0)

    message = str(raised.value)
    assert "postgresql+psycopg://app:***@127.0.0.1" in message
    assert "attempts" in message
    assert PASSWORD not in message
    # The driver's message is quoted (redacted); its error, SQLAlchemy's text, is not chained.
    assert raised.value.__cause__ is None and raised.value.__context__ is None


class _StartServerOnRetry(logging.Handler):
    """Starts the stopped server when the store logs its first retry: no race, no sleep."""

    def __init__(self, server: PostgresServer) -> None:
        super().__init__()
        self.server = server
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1
            self.server.start()


@pytest.mark.faults
def test_a_connection_refused_while_the_server_restarts_is_retried(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    store = Ledger(url=postgres_url, connect_retry_seconds=60)
    store.start_run("run-1", "orders", None, T0)
    handler = _StartServerOnRetry(postgres_server)
    logger = logging.getLogger(db.__name__)
    logger.addHandler(handler)
    try:
        postgres_server.stop()
        finalize(store, "run-1", status="completed", counts=Counts(), pages_done=0, finished_at=T0)
    finally:
        logger.removeHandler(handler)
        postgres_server.start()

    assert handler.retries >= 1
    [row] = store.runs(run_id="run-1")
    assert row.flow_status == "completed"


def test_a_final_write_is_skipped_for_a_run_that_moved_since_it_was_decided(
    store: Ledger,
) -> None:
    """A heartbeat, page write or ack between the finalizer's read and its lock means the
    run is alive: the final state decided on the older row is not written (next tick)."""
    store.start_run("run-1", "orders", None, T0)
    [decided_on] = store.runs(run_id="run-1")
    final = FinalState(
        "run-1", "failed", Counts(), 0, T0 + timedelta(hours=2), "stalled",
        last_progress_at=decided_on.updated_at,
    )  # fmt: skip
    assert store.heartbeat("run-1")  # the step is alive after all
    assert store.finalize_many([final]) == []
    assert store.runs(run_id="run-1")[0].flow_status == "running"

    [now] = store.runs(run_id="run-1")
    again = FinalState(
        "run-1", "completed", Counts(), 0, T0 + timedelta(hours=3), last_progress_at=now.updated_at
    )
    assert store.finalize_many([again]) == ["run-1"]
    assert store.runs(run_id="run-1")[0].flow_status == "completed"


def test_pages_of_a_final_run_are_refused_unless_it_awaits_its_dagster_run(
    store: Ledger,
) -> None:
    """Nothing is recorded after the final write (a step that outlived its run); a run
    decided while its Dagster run still worked (stalled) still takes its steps' pages."""
    page = PageRecord(0, Counts(1, 1), "dispatched", ["k"])
    for run_id, awaiting in (("gone", False), ("stalled", True)):
        store.start_run(run_id, "orders", None, T0)
        final = FinalState(run_id, "failed", Counts(), 0, T0, awaiting_dagster=awaiting)
        assert store.finalize_many([final]) == [run_id]
    with pytest.raises(RunFinalError, match="already final"):
        store.record_pages("gone", [page])
    assert store.page_totals(["gone"])["gone"].counts == Counts()
    assert [p.page_index for p in store.record_pages("stalled", [page])] == [0]


def test_the_resource_returns_a_ledger_with_its_settings(database_url: str) -> None:
    from resources.ledger.metrics_store import MetricsStore

    ledger = MetricsStore(url=database_url, connect_retry_seconds=2.5).ledger()
    assert ledger == Ledger(url=database_url, auto_migrate=True, connect_retry_seconds=2.5)
    ledger.start_run("r-resource", "orders", None, T0)
    assert [row.run_id for row in Ledger(url=database_url).runs()] == ["r-resource"]
    with pytest.raises(ValueError, match="connect_retry_seconds"):
        Ledger(url=database_url, connect_retry_seconds=-1)


def test_a_final_row_keeps_its_plan(store: Ledger) -> None:
    """A plan or collect step still going when its run was finalized (a re-execution the
    finalizer did not see yet) writes nothing over the final row."""
    store.start_run("r", "orders", None, T0)
    store.record_plan("r", 2, 20)
    assert finalize(store, "r", status="failed", counts=Counts(), pages_done=0, finished_at=T0)
    [final] = store.runs(run_id="r")
    with pytest.raises(RunFinalError):
        store.record_plan("r", 5, 50)
    with pytest.raises(RunFinalError):
        store.mark_extraction_done("r")
    assert store.runs(run_id="r") == [final]
    with pytest.raises(ValueError, match="call start_run first"):
        store.record_plan("unknown", 1, None)
