"""A flow run finalized once and then continued: re-executed, or decided again when the
Dagster run it was declared stalled beside ends. Each test is a path on which the final row
(or what Dagster shows of it) used to be wrong.

Real Redis, real SQLite and PostgreSQL ledgers, real Dagster instances, real ``rq worker``
processes. Two stand-ins, said where used: ``join_flow_run`` gets a minimal op context (a
real ``DagsterRun`` of a real instance, and that instance) so that a Redis flush can land
between one step's claim and its pre-write while another step joins; and the publisher
gets a ledger that finalizes the run again at one precise instant (``RefinalizeBeforeMark``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import dagster as dg
import pytest

from flow_assets.dagster_flow import join_flow_run
from flow_assets.dagster_names import ROOT_RUN_ID_TAG
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.page_step import process_pages
from flow_assets.rq.dispatch import RqDispatch
from flow_assets.sources.base import Page, SequentialSource
from resources.counts import Counts
from resources.flow_run import FlowRun
from resources.ledger.ledger import Ledger
from resources.ledger.records import FinalState, PageRecord, RunRow
from resources.live.counters import RESTORED_FIELD, LiveCounters
from resources.live.lua_final import FORGET_FINAL_RUN
from sensors.cleanup import remove_stray_keys
from sensors.finalizer import FlowPolicy, finalize_runs
from sensors.publish import publish_final_runs
from tests.dagster import settle_flows
from tests.dagster.rq_flows import rq_workers
from tests.faults.test_redis_loss_claims import FlushAfterClaim
from tests.flowkit import (
    NoSource,
    assert_counts,
    latest_materialization_metadata,
    make_defs,
    row_of,
    run_flow,
    status_tag,
    tick,
)

pytestmark = [pytest.mark.faults]

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def dagster_run(
    instance: dg.DagsterInstance, job: str, run_id: str, status: dg.DagsterRunStatus, **kw: Any
) -> dg.DagsterRun:
    """A run record in the instance, as Dagster writes one (no execution behind it)."""
    run = dg.DagsterRun(job_name=job, run_id=run_id, status=status, **kw)
    instance.add_run(run)
    return run


def first_attempt(
    flow: Flow, run_id: str, store: Ledger, counters: LiveCounters, *, planned: int
) -> None:
    """The flow run's first Dagster run, as far as the ledger and Redis know it: ``planned``
    pages planned, page 0 (record ``a``) recorded."""
    store.start_run(run_id, flow.name, None, T0, flow.run_policy())
    counters.start_run(flow.name, run_id)
    process_pages(flow, run_id, [Page(0, [{"id": "a"}])], counters, store)
    store.record_plan(run_id, planned, None)


def step_context(instance: dg.DagsterInstance, run: dg.DagsterRun) -> Any:
    """What ``join_flow_run`` reads of an op's context: its run and its instance."""
    return SimpleNamespace(run=run, instance=instance)


# ----------------------------------------------- a reopened run whose Redis is flushed


def test_a_reopened_run_flushed_between_a_claim_and_its_prewrite_hands_each_key_once(
    database_url: str, redis_url: str
) -> None:
    """The run failed and was finalized (its Redis state removed at publish). A re-execution
    reopens it; step C claims page 1 (k, x) in Redis, then Redis is flushed before C's
    pre-write, while step D joins (restoring the state from the ledger, which has no claim
    of C yet) and runs page 2 (k, y) whole. The ledger decides the keys of a reopened run:
    k reaches the handler once and is counted skipped once."""
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    handled: Counter[str] = Counter()
    failing = {"on": True}

    def handler(batch: JobBatch) -> None:
        handled.update(batch.keys)
        for key in batch.keys if failing["on"] else ():
            batch.fail(key, RuntimeError("downstream down"))

    flow = Flow(name="reopened", source=NoSource(), key="id", handler=handler)
    root, job = "root-run", "reopened_job"
    first_attempt(flow, root, store, counters, planned=3)
    with dg.DagsterInstance.ephemeral() as instance:
        dagster_run(instance, job, root, dg.DagsterRunStatus.FAILURE)
        report = finalize_runs(instance, store, counters, {flow.name: FlowPolicy()})
        assert report.finalized == {root: "failed"}
        assert counters.totals(flow.name, root) is None  # removed when published
        handled.clear()
        failing["on"] = False

        rerun = dagster_run(
            instance,
            job,
            "rerun",
            dg.DagsterRunStatus.STARTED,
            parent_run_id=root,
            root_run_id=root,
            tags={ROOT_RUN_ID_TAG: root},
        )
        context = step_context(instance, rerun)
        assert join_flow_run(context, flow, store, counters) == root  # step C reopens

        def step_d() -> None:
            counters.client().flushall()
            join_flow_run(context, flow, store, counters)
            process_pages(flow, root, [Page(2, [{"id": "k"}, {"id": "y"}])], counters, store)

        step_c = cast(LiveCounters, FlushAfterClaim(counters, {1: step_d}))
        process_pages(flow, root, [Page(1, [{"id": "k"}, {"id": "x"}])], step_c, store)

    assert handled == Counter({"k": 1, "x": 1, "y": 1})
    totals = store.page_totals([root])[root].counts
    assert totals == Counts(source=5, dispatched=4, skipped=1, completed=3, failed=1)
    owners = store.claimed_keys(root)
    assert sorted(owners) == ["a", "k", "x", "y"]  # k on one page only


# ------------------------------------------- publishing a row finalized again meanwhile


class RefinalizeBeforeMark(Ledger):
    """The ledger; once, right before the publisher marks its rows published, a
    re-execution reopens the run and another finalizer writes it again (revision 2)."""

    def mark_published(self, rows: Any, at: datetime) -> list[str]:
        for row in rows:
            if row.revision == 1:
                assert self.reopen(row.run_id)
                page = PageRecord(1, Counts(source=2, dispatched=2, failed=2), "done", ["c", "d"])
                self.record_pages(row.run_id, [page])
                final = FinalState(row.run_id, "failed", Counts(3, 3, failed=3), 2, T0, "second")
                assert self.finalize_many([final]) == [row.run_id]
        return super().mark_published(rows, at)


def test_a_row_finalized_again_while_it_is_published_goes_out_at_its_new_revision(
    database_url: str, redis_url: str
) -> None:
    counters = LiveCounters(url=redis_url)
    store = RefinalizeBeforeMark(url=database_url)
    store.start_run("r1", "pub", None, T0)
    store.record_pages("r1", [PageRecord(0, Counts(1, 1, failed=1), "done", ["b"])])
    assert store.finalize_many([FinalState("r1", "failed", Counts(1, 1, failed=1), 1, T0, "first")])
    with dg.DagsterInstance.ephemeral() as instance:
        first = publish_final_runs(instance, store, counters, T0, limit=10)
        assert first == []  # it went out at revision 1, then changed: not marked published
        [row] = store.unpublished_runs(10)
        assert (row.revision, row.failed_jobs) == (2, 3)

        second = publish_final_runs(instance, store, counters, T0, limit=10)
        assert [published.revision for published in second] == [2]
        metadata = latest_materialization_metadata(instance, "pub")
        assert (metadata["flow_run_revision"], metadata["failed_jobs"]) == (2, 3)
    assert store.unpublished_runs(10) == []


# ------------------------------ RQ jobs of a run declared stalled beside its Dagster run


def test_rq_jobs_dispatched_while_a_run_awaits_its_dagster_run_count_when_it_ends(
    database_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finalizer declared the run stalled while its Dagster run still worked (Dagster's
    time between steps is not heartbeated). Its page step then dispatches four jobs; a live
    worker runs them (their outcomes recorded as late) rather than skipping them, and
    finalizing did not cancel them. When the Dagster run ends the run is reopened and
    decided again: completed, every job counted, Redis restored rather than reported lost."""
    monkeypatch.setenv("FLOW_DATABASE_URL", database_url)  # the workers' ledger
    flow = worker_flow()
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    run_id, job = "awaited", f"{flow.name}_job"
    store.start_run(run_id, flow.name, None, T0, flow.run_policy())
    counters.start_run(flow.name, run_id)
    handled = tmp_path / "handled.txt"
    with dg.DagsterInstance.ephemeral() as instance:
        dagster_run(instance, job, run_id, dg.DagsterRunStatus.STARTED)
        stalled = finalize_runs(instance, store, counters, {}, now=T0 + timedelta(minutes=6))
        assert stalled.finalized == {run_id: "failed"}
        assert store.runs(run_id=run_id)[0].awaiting_dagster

        store.record_plan(run_id, 1, None)
        page = Page(0, [{"id": key} for key in ("r1", "r2", "r3", "r4")])
        process_pages(flow, run_id, [page], counters, store)
        store.mark_extraction_done(run_id)
        env = {"FLOW_DATABASE_URL": database_url, "FLOW_TEST_HANDLED": str(handled)}
        with rq_workers(1, flow.name, redis_url, env, tmp_path, "rq.worker.SimpleWorker"):
            wait_until(lambda: store.late_jobs([run_id])[run_id] == 4, "four late outcomes")
        assert sorted(handled.read_text().split()) == ["r1", "r2", "r3", "r4"]

        instance.delete_run(run_id)
        dagster_run(instance, job, run_id, dg.DagsterRunStatus.SUCCESS)
        decided = finalize_runs(instance, store, counters, {})
    assert decided.reopened == [run_id]
    assert decided.finalized == {run_id: "completed"}
    row = store.runs(run_id=run_id)[0]
    assert_counts(row, Counts(source=4, dispatched=4, completed=4))
    assert row.counter_mismatch is None


def worker_flow() -> Flow:
    """An RQ flow the test workers load (``tests.dagster.rq_flows.WORKER_FLOWS``)."""
    return Flow(
        name="late_orders",
        source=NoSource(),
        key="id",
        handler=settle_flows.handle,
        dispatch=RqDispatch(retries=0, job_timeout=60),
        deadline=timedelta(minutes=5),
    )


def wait_until(ready: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------- a plan step reading for long


class SlowPages(SequentialSource):
    """Two pages read in order; between them the finalizer ticks, well past the deadline."""

    name = "slow"

    def __init__(self, between: Any) -> None:
        self.between = between

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        yield Page(0, [{"id": "a"}, {"id": "b"}])
        self.between()
        yield Page(1, [{"id": "c"}])


def test_a_plan_step_reading_past_the_deadline_keeps_its_run_alive(
    sqlite_url: str, redis_url: str, instance: dg.DagsterInstance
) -> None:
    """A sequential source is read in full by the plan step. Reading it takes longer than
    the flow's 1 s deadline; a finalizer deciding meanwhile waits, as the plan step
    heartbeats. The run ends completed with every record."""
    reports: list[Any] = []
    store, counters = Ledger(url=sqlite_url), LiveCounters(url=redis_url)

    def tick_while_reading() -> None:
        time.sleep(1.5)
        reports.append(finalize_runs(instance, store, counters, {}))

    flow = Flow(
        name="slow_plan",
        source=SlowPages(tick_while_reading),
        key="id",
        handler=lambda batch: None,
        deadline=timedelta(seconds=1),
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, flow.name, instance)
    assert result.success
    [report] = reports
    assert report.finalized == {} and list(report.waiting) == [result.run_id]
    tick(defs, instance)
    row: RunRow = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "completed", row.failure_reason
    assert_counts(row, Counts(source=3, dispatched=3, completed=3))


# ------------------------------------------- no loss note where Redis lost nothing


@pytest.mark.parametrize("keys_at_reopen", ["removed at publish", "outlived the finalization"])
def test_the_reopening_step_restoring_late_keeps_the_claims_of_steps_that_joined_first(
    database_url: str, redis_url: str, keys_at_reopen: str
) -> None:
    """Step A reopens the run, then (while it tags the group's Dagster runs) step B joins,
    restores the Redis state and claims page 1; only then does A restore. A does not
    overwrite B's claim: step C's page 2 finds k taken, no page is realigned, and the final
    row carries no note of a Redis loss that never was. Whether the finalization removed the
    run's keys, or they outlived it (reopened before it was published, Redis down then)."""
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    handled: Counter[str] = Counter()
    flow = Flow(name="late_restore", source=NoSource(), key="id", handler=handled_by(handled))
    root, job = "root-run", "late_restore_job"
    first_attempt(flow, root, store, counters, planned=3)
    with dg.DagsterInstance.ephemeral() as instance:
        dagster_run(instance, job, root, dg.DagsterRunStatus.FAILURE)
        if keys_at_reopen == "removed at publish":
            assert finalize_runs(instance, store, counters, {}).finalized == {root: "failed"}
        else:
            final = FinalState(root, "failed", Counts(1, 1, completed=1), 1, T0, "stalled")
            assert store.finalize_many([final]) == [root]
        group: dict[str, Any] = {
            "parent_run_id": root,
            "root_run_id": root,
            "tags": {ROOT_RUN_ID_TAG: root},
        }
        rerun = dagster_run(instance, job, "rerun", dg.DagsterRunStatus.STARTED, **group)
        context = step_context(instance, rerun)
        handled.clear()

        assert store.reopen(root)  # step A, first half of its join
        assert join_flow_run(context, flow, store, counters) == root  # step B joins

        def a_restores_then_c_runs() -> None:
            FlowRun(flow.name, root, store, counters).restore_reopened(1)  # A's second half
            join_flow_run(context, flow, store, counters)
            process_pages(flow, root, [Page(2, [{"id": "k"}, {"id": "y"}])], counters, store)

        step_b = cast(LiveCounters, FlushAfterClaim(counters, {1: a_restores_then_c_runs}))
        process_pages(flow, root, [Page(1, [{"id": "k"}, {"id": "x"}])], step_b, store)

        instance.delete_run(rerun.run_id)
        dagster_run(instance, job, rerun.run_id, dg.DagsterRunStatus.SUCCESS, **group)
        report = finalize_runs(instance, store, counters, {})
    assert handled == Counter({"k": 1, "x": 1, "y": 1})
    assert report.finalized == {root: "partial_success"}
    row = store.runs(run_id=root)[0]
    assert_counts(row, Counts(source=5, dispatched=4, skipped=1, completed=4))
    assert row.counter_mismatch is None


def handled_by(handled: Counter[str]) -> Any:
    def handler(batch: JobBatch) -> None:
        handled.update(batch.keys)

    return handler


class ReopenWhilePublishing(Ledger):
    """The ledger; once, right after the publisher's step ``at`` (``statuses``: it checked
    its rows are still final; ``mark_published``: it marked them), a re-execution reopens
    the run and restores its Redis state (``then``)."""

    at: str = ""
    then: Any = None

    def _fire(self, step: str) -> None:
        then, self.then = (self.then, None) if step == self.at else (None, self.then)
        if then is not None:
            then()

    def statuses(self, run_ids: Any) -> Any:
        found = super().statuses(run_ids)
        self._fire("statuses")
        return found

    def mark_published(self, rows: Any, at: datetime) -> list[str]:
        marked = super().mark_published(rows, at)
        self._fire("mark_published")
        return marked


@pytest.mark.parametrize("reopened_after", ["statuses", "mark_published"])
def test_a_run_reopened_while_it_is_published_keeps_its_redis_state_and_running_tag(
    database_url: str, redis_url: str, reopened_after: str
) -> None:
    """Reopened after the publisher checked the row, it is not marked published and keeps
    its keys; reopened right after the mark, its keys are kept too (the publisher's delete
    and its check of the restore mark are one Lua script). Either way the re-execution's
    next page finds its state, no Redis loss is noted, and its Dagster runs say running."""
    store, counters = ReopenWhilePublishing(url=database_url), LiveCounters(url=redis_url)
    flow = Flow(name="reopened_pub", source=NoSource(), key="id", handler=lambda batch: None)
    root, job = "root-run", "reopened_pub_job"
    first_attempt(flow, root, store, counters, planned=2)
    with dg.DagsterInstance.ephemeral() as instance:
        dagster_run(instance, job, root, dg.DagsterRunStatus.FAILURE)
        rerun = dg.DagsterRun(
            job_name=job,
            run_id="rerun",
            status=dg.DagsterRunStatus.STARTED,
            parent_run_id=root,
            root_run_id=root,
            tags={ROOT_RUN_ID_TAG: root},
        )

        def reexecution_joins() -> None:
            instance.add_run(rerun)
            assert join_flow_run(step_context(instance, rerun), flow, store, counters) == root

        store.at, store.then = reopened_after, reexecution_joins
        report = finalize_runs(instance, store, counters, {})
        assert report.finalized == {root: "failed"}
        marked = reopened_after == "mark_published"
        assert [row.run_id for row in report.published] == ([root] if marked else [])
        assert store.runs(run_id=root)[0].flow_status == "running"
        assert counters.totals(flow.name, root) is not None  # not removed under its steps
        assert status_tag(instance, root) == "running"
        assert status_tag(instance, rerun.run_id) == "running"
        process_pages(flow, root, [Page(1, [{"id": "b"}])], counters, store)
    assert store.runs(run_id=root)[0].counter_mismatch is None


def test_the_restore_mark_is_the_field_the_forget_script_reads() -> None:
    assert f"'{RESTORED_FIELD}'" in FORGET_FINAL_RUN


# ----------------------------------- a stalled run whose Dagster run never says it ended


def test_jobs_of_a_stalled_run_whose_dagster_run_never_ends_count_when_they_report(
    database_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the Dagster run stays STARTED for good (its run worker died, no run
    monitoring). The jobs' outcomes reopen the run: they count, none is called lost."""
    monkeypatch.setenv("FLOW_DATABASE_URL", database_url)
    flow = worker_flow()
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    run_id = "stuck"
    store.start_run(run_id, flow.name, None, T0, flow.run_policy())
    counters.start_run(flow.name, run_id)
    with dg.DagsterInstance.ephemeral() as instance:
        dagster_run(instance, f"{flow.name}_job", run_id, dg.DagsterRunStatus.STARTED)
        later = T0 + timedelta(minutes=6)
        assert finalize_runs(instance, store, counters, {}, now=later).finalized
        store.record_plan(run_id, 1, None)
        page = Page(0, [{"id": key} for key in ("r1", "r2", "r3")])
        process_pages(flow, run_id, [page], counters, store)
        store.mark_extraction_done(run_id)
        env = {"FLOW_DATABASE_URL": database_url}
        with rq_workers(1, flow.name, redis_url, env, tmp_path, "rq.worker.SimpleWorker"):
            wait_until(lambda: store.late_jobs([run_id])[run_id] == 3, "three late outcomes")

        reopened = finalize_runs(instance, store, counters, {})
        assert reopened.reopened == [run_id] and run_id in reopened.waiting
        assert status_tag(instance, run_id) == "running"  # not the stalled verdict's
        assert store.page_totals([run_id])[run_id].counts == Counts(3, 3, completed=3)
        much_later = datetime.now(timezone.utc) + timedelta(minutes=6)
        stalled = finalize_runs(instance, store, counters, {}, now=much_later)
    assert stalled.finalized == {run_id: "failed"}  # its Dagster run never ended: stalled
    row = store.runs(run_id=run_id)[0]
    assert_counts(row, Counts(source=3, dispatched=3, completed=3))
    assert row.counter_mismatch is None


def test_cleanup_keeps_the_keys_a_reexecution_restored_after_it_looked(
    database_url: str, redis_url: str
) -> None:
    """The periodic cleanup found a final run's keys left behind; before it removed them a
    re-execution reopened the run and restored its state. The cleanup's delete is the
    publisher's (check the restore mark and delete in one script): the state stays."""
    store, counters = ReopenWhilePublishing(url=database_url), LiveCounters(url=redis_url)
    flow = Flow(name="stray", source=NoSource(), key="id", handler=lambda batch: None)
    root = "root-run"
    first_attempt(flow, root, store, counters, planned=2)
    final = FinalState(root, "failed", Counts(1, 1, completed=1), 1, T0, "step crashed")
    assert store.finalize_many([final]) == [root]  # not published: its keys are left

    def reexecution_restores() -> None:
        assert store.reopen(root)
        FlowRun(flow.name, root, store, counters).restore_reopened(1)

    store.at, store.then = "statuses", reexecution_restores
    strays = remove_stray_keys(store, counters)
    assert [(stray.run_id, stray.flow_status, stray.revision) for stray in strays] == [
        (root, "failed", 1)
    ]
    assert counters.totals(flow.name, root) is not None
