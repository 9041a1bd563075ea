"""Model-based test of the accounting: random interleavings of page attempts, retries, job
outcomes, double acks, crashes, Redis loss and SCRIPT FLUSH drive the real process_page on a
real Redis and a real SQLite ledger, and the real finalizer on an ephemeral Dagster instance,
against a small in-memory model. Nothing is faked; the handler (scripted by hypothesis) and
the fixed pages are the test's own."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from flow_assets.dispatch import JobBatch
from flow_assets.errors import HandlerError
from flow_assets.flow import Flow
from flow_assets.page_step import process_page
from flow_assets.sources.base import Page, PageRef
from resources.counts import Counts
from resources.keys import run_key, run_keys
from resources.metrics_store import MetricsStore, PageTotals
from resources.redis_counters import RedisCounters
from sensors.classify import RunSnapshot, RunState, Tolerance, classify
from sensors.finalizer import FlowPolicy, finalize_runs

FLOW = "model_flow"
DEADLINE = timedelta(hours=1)
COMPLETE, FAIL = "complete", "fail"

# Each record beside the key the model expects for it (None: rejected by validation). Keys
# overlap across pages (a, c, e, g) and within pages (f, and 7 == "7"); pages 0, 3 and 5 (empty)
# are clean together, so a run can also end ``completed``.
PAGES: tuple[tuple[tuple[Any, str | None], ...], ...] = (
    (({"id": "a"}, "a"), ({"id": "b"}, "b"), ({"id": "c"}, "c")),
    (({"id": "c"}, "c"), ({"id": "d"}, "d"), ({"id": "e"}, "e"), ({"id": "a", "v": 2}, "a")),
    (({"id": "f"}, "f"), ({"name": "no id"}, None), ({"id": "g"}, "g"), ({"id": "f"}, "f")),
    (({"id": "h"}, "h"), ({"id": "i"}, "i")),
    (({"id": "g"}, "g"), ({"id": "b"}, "b"), ("not an object", None)),
    (),
    (({"id": 7}, "7"), ({"id": "7"}, "7"), ({"id": True}, None), ({"id": "e"}, "e")),
)

# What a handler may report for one job, in order: nothing, one ack, or a double ack.
OUTCOMES = ((), (COMPLETE,), (FAIL,), (COMPLETE, COMPLETE), (FAIL, FAIL), (FAIL, COMPLETE),
            (COMPLETE, FAIL))  # fmt: skip


class HandlerCrash(RuntimeError):
    """The test handler dying midway through a page (a crashed step)."""


@dataclass(frozen=True)
class Plan:
    """What the handler does on one attempt: outcomes by job position, and maybe a crash."""

    outcomes: tuple[tuple[str, ...], ...]
    crash_at: int | None  # raise before reporting job N (past the end: after all of them)
    by_key: bool  # report jobs by key instead of by record object
    final: bool = False  # the step's last attempt (Dagster will not retry it)

    def verbs(self, position: int) -> tuple[str, ...]:
        return self.outcomes[position] if position < len(self.outcomes) else ()


plans = st.builds(
    Plan,
    outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=5).map(tuple),
    crash_at=st.sampled_from([None, None, None, None, 0, 1, 9]),
    by_key=st.booleans(),
    final=st.booleans(),
)


def fresh_page(index: int) -> Page:
    """Page ``index`` as a source would return it again: same content, new objects."""
    records = [dict(r) if isinstance(r, dict) else r for r, _ in PAGES[index]]
    return Page(index=index, records=records, label=f"model page {index}")


class FixedPages:
    """A source over PAGES (the Flow needs one; process_page is given pages directly)."""

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        return [PageRef(index) for index in range(len(PAGES))]

    def fetch(self, ref: PageRef) -> Page:
        return fresh_page(ref.index)

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        return (fresh_page(index) for index in range(len(PAGES)))


@dataclass
class Model:
    """The accounting, from the rules alone: who owns a key, what a page's latest attempt
    counted, and whether Redis currently holds the run."""

    owner: dict[str, int] = field(default_factory=dict)  # key -> first page to claim it
    latest: dict[int, Counts] = field(default_factory=dict)  # page -> latest attempt
    failed_keys: dict[int, set[str]] = field(default_factory=dict)  # page -> failed jobs
    crashed: set[int] = field(default_factory=set)  # pages whose latest attempt crashed
    redis_lost: bool = False
    mismatch_noted: bool = False

    def attempt(self, index: int, plan: Plan) -> tuple[Counts, bool]:
        """Apply one attempt of page ``index``; its expected counts, and whether it crashes."""
        if self.redis_lost:  # the attempt finds the run lost, rebuilds it and says so
            self.redis_lost, self.mismatch_noted = False, True
        keys = [key for _, key in PAGES[index] if key is not None]
        mine: list[str] = []
        for key in keys:
            self.owner.setdefault(key, index)
            if self.owner[key] == index and key not in mine:
                mine.append(key)
        crashes = plan.crash_at is not None and bool(mine)  # no jobs: no handler call
        # A crash on the last attempt fails the jobs not yet reported, and the page is done.
        left_pending = crashes and not plan.final
        reached = plan.crash_at if crashes and plan.crash_at is not None else len(mine)
        failed = set()
        if not left_pending:
            for position, key in enumerate(mine):
                verbs = plan.verbs(position) if position < reached else ()
                if COMPLETE not in verbs and (FAIL in verbs or crashes):
                    failed.add(key)
        counts = Counts(
            source=len(PAGES[index]),
            dispatched=len(mine),
            skipped=len(keys) - len(mine),
            rejected=len(PAGES[index]) - len(keys),
            completed=0 if left_pending else len(mine) - len(failed),
            failed=len(failed),
        )
        self.latest[index], self.failed_keys[index] = counts, failed
        (self.crashed.add if left_pending else self.crashed.discard)(index)
        return counts, crashes

    def totals(self) -> Counts:
        return sum(self.latest.values(), Counts())

    def status(self, tolerance: int | float) -> str | None:
        """Final status of a succeeded Dagster run with extraction done (None: not final)."""
        counts = self.totals()
        if counts.pending:
            return None
        limit = tolerance * counts.dispatched if isinstance(tolerance, float) else tolerance
        if counts.failed > limit:
            return "failed"
        if counts.skipped or counts.rejected or counts.failed:
            return "partial_success"
        return "completed"


class Services(NamedTuple):
    """The real things a machine runs on, built by the test's fixtures."""

    store: MetricsStore
    counters: RedisCounters
    instance: dg.DagsterInstance


class AccountingMachine(RuleBasedStateMachine):
    """One flow run per example; rules are the faults and attempts, invariants the checks."""

    services: Services  # set by bind()

    def __init__(self) -> None:
        super().__init__()
        self.store, self.counters = self.services.store, self.services.counters
        self.run_id = str(uuid.uuid4())
        self.model = Model()
        self.tolerance: int | float = 0
        self.plan = Plan((), None, False)
        self.flow = Flow(name=FLOW, source=FixedPages(), key="id", handler=self._handle)
        # What the flow job's plan op does when a run starts.
        self.store.start_run(self.run_id, FLOW, None, datetime.now(timezone.utc))
        self.counters.start_run(FLOW, self.run_id)

    def _handle(self, batch: JobBatch) -> None:
        for position, (key, record) in enumerate(batch.items()):
            if position == self.plan.crash_at:
                raise HandlerCrash(f"handler died before job {position} of the page")
            for verb in self.plan.verbs(position):
                job = key if self.plan.by_key else record
                if verb == COMPLETE:
                    batch.complete(job)
                else:
                    batch.fail(job, ValueError(f"job {key} failed"))
        if self.plan.crash_at is not None:
            raise HandlerCrash("handler died after reporting every job of the page")

    @initialize(
        tolerance=st.sampled_from([0, 1, 2, 0.25, 0.5]),
        first_pass=st.lists(
            st.tuples(st.integers(0, len(PAGES) - 1), plans), unique_by=lambda t: t[0]
        ),
    )
    def plan_the_run(self, tolerance: int | float, first_pass: list[tuple[int, Plan]]) -> None:
        """The run's tolerance, and its pages handed out once (a fan-out) in some order."""
        self.tolerance = tolerance
        for index, plan in first_pass:
            self._attempt(index, plan)

    # --- rules -------------------------------------------------------------------------

    @rule(index=st.integers(0, len(PAGES) - 1), plan=plans)
    def attempt_page(self, index: int, plan: Plan) -> None:
        self._attempt(index, plan)

    @precondition(lambda self: bool(self.model.latest))
    @rule(data=st.data(), plan=plans)
    def retry_page(self, data: st.DataObject, plan: Plan) -> None:
        self._attempt(data.draw(st.sampled_from(sorted(self.model.latest)), "page"), plan)

    @rule(how=st.sampled_from(["flushall", "delete_run_keys", "evict_meta"]))
    def lose_redis_state(self, how: str) -> None:
        client = self.counters.client()
        if how == "flushall":
            client.flushall()
        elif how == "delete_run_keys":
            client.delete(*run_keys(FLOW, self.run_id))
        else:  # the sentinel alone evicted: the run counts as lost and is rebuilt whole
            client.delete(run_key(FLOW, self.run_id, "meta"))
        self.model.redis_lost = True

    @rule()
    def script_flush(self) -> None:
        self.counters.client().script_flush()

    def _attempt(self, index: int, plan: Plan) -> None:
        self.plan = plan
        expected, crashes = self.model.attempt(index, plan)
        page = fresh_page(index)
        if crashes:
            with pytest.raises(HandlerError, match="HandlerCrash: handler died"):
                process_page(
                    self.flow,
                    self.run_id,
                    page,
                    self.counters,
                    self.store,
                    final_attempt=plan.final,
                )
        else:
            got = process_page(
                self.flow, self.run_id, page, self.counters, self.store, final_attempt=plan.final
            )
            assert got == expected, f"page {index}: process_page returned {got}, model {expected}"

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def accounting_matches_model(self) -> None:
        """After every step: the ledger, Redis and the would-be status against the model."""
        totals = self.store.page_totals([self.run_id])[self.run_id]
        self._check_ledger(totals)
        self._check_redis(totals.counts)
        self._check_status(totals.counts)

    def _check_ledger(self, totals: PageTotals) -> None:
        counts, model = totals.counts, self.model
        assert counts.conservation_errors() == [], counts
        assert counts.dispatched + counts.skipped + counts.rejected <= counts.source, counts
        assert counts.completed + counts.failed <= counts.dispatched, counts
        assert counts == model.totals(), f"ledger {counts} != model {model.totals()}"
        assert (totals.pages_seen, totals.pages_done) == (
            len(model.latest),
            len(model.latest) - len(model.crashed),
        ), totals
        assert self.store.claimed_keys(self.run_id) == model.owner
        failures = {f.record_key for f in self.store.job_failures(self.run_id)}
        assert failures == set().union(*model.failed_keys.values())
        assert len(self.store.rejected_records(self.run_id)) == counts.rejected
        noted = self.store.runs(run_id=self.run_id)[0].counter_mismatch is not None
        assert noted == model.mismatch_noted, "Redis loss not noted on the run (or noted twice)"

    def _check_redis(self, ledger: Counts) -> None:
        live = self.counters.totals(FLOW, self.run_id)
        assert (live is None) == self.model.redis_lost, f"Redis totals {live}"
        if live is None:
            return
        seen = self.counters.client().hgetall(run_key(FLOW, self.run_id, "seen"))
        assert seen == {key: str(page) for key, page in self.model.owner.items()}
        assert live == ledger, f"Redis {live} != ledger {ledger}"  # crashed attempts too

    def _check_status(self, ledger: Counts) -> None:
        """The status classify() gives the ledger if the run succeeded right now."""
        now = datetime.now(timezone.utc)
        snapshot = RunSnapshot(ledger, True, RunState.SUCCEEDED, now)
        verdict = classify(snapshot, Tolerance(self.tolerance), now, DEADLINE)
        assert verdict.status == self.model.status(self.tolerance), verdict

    def teardown(self) -> None:
        try:
            # Teardown runs inside hypothesis's `finally`: after a failed step, only clean up.
            if sys.exc_info()[1] is None:
                self._finalize_and_check()
        finally:
            self.counters.delete_run(FLOW, self.run_id)

    def _finalize_and_check(self) -> None:
        """End the run as the collect op and finalizer ticks would, and check the row."""
        self.store.record_plan(self.run_id, len(self.model.latest), None)
        run = dg.DagsterRun(
            job_name=f"{FLOW}_job", run_id=self.run_id, status=dg.DagsterRunStatus.SUCCESS
        )
        self.services.instance.add_run(run)
        if self.model.status(self.tolerance) is None:
            assert self._finalize() is None, "a run with pending jobs was finalized"
            # The retry policy re-runs the crashed pages, which now finish: the run can end.
            for index in sorted(self.model.crashed):
                self._attempt(index, Plan((), None, by_key=False))
            self.accounting_matches_model()
        expected = self.model.status(self.tolerance)
        assert expected is not None
        assert self._finalize() == expected
        row = self.store.runs(run_id=self.run_id)[0]
        assert row.flow_status == expected, row
        assert row.counts == self.model.totals(), row
        assert row.pages_done == len(self.model.latest)
        lost = self.model.mismatch_noted or self.model.redis_lost
        assert (row.counter_mismatch is not None) == lost, row.counter_mismatch
        assert self.counters.ttl_report(FLOW, self.run_id) == {}, "run keys left after publish"

    def _finalize(self) -> str | None:
        """One finalizer pass; this run's final status, or None if it is left waiting."""
        policy = FlowPolicy(Tolerance(self.tolerance), DEADLINE)
        report = finalize_runs(self.services.instance, self.store, self.counters, {FLOW: policy})
        status = report.finalized.get(self.run_id)
        assert (status is None) == (self.run_id in report.waiting), report
        return status


def bind(services: Services) -> type[AccountingMachine]:
    """The machine class wired to this test's servers (state machines take no fixtures)."""
    return type("AccountingModel", (AccountingMachine,), {"services": services})


MODEL_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # reproducible: the same interleavings on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture
def services(redis_url: str, tmp_path: Path) -> Iterator[Services]:
    """A fresh SQLite ledger, the session's flushed Redis, an ephemeral Dagster instance."""
    with dg.DagsterInstance.ephemeral() as instance:
        store = MetricsStore(url=f"sqlite:///{tmp_path / 'ledger.db'}")
        yield Services(store, RedisCounters(url=redis_url), instance)


def test_accounting_matches_the_model(services: Services) -> None:
    run_state_machine_as_test(bind(services), settings=MODEL_SETTINGS)


def new_run(services: Services) -> str:
    """A started run, as the flow job's plan op leaves it."""
    run_id = str(uuid.uuid4())
    services.store.start_run(run_id, FLOW, None, datetime.now(timezone.utc))
    services.counters.start_run(FLOW, run_id)
    return run_id


def crash(batch: JobBatch) -> None:
    raise HandlerCrash("handler died mid-page")


def test_redis_equals_ledger_after_a_crashed_attempt(services: Services) -> None:
    """A crashed attempt leaves its page pending in the ledger and in Redis alike, so the
    failed run is finalized without a (false) counter mismatch note."""
    store, counters, instance = services
    run_id = new_run(services)
    flow = Flow(name=FLOW, source=FixedPages(), key="id", handler=crash)
    with pytest.raises(HandlerError):
        process_page(flow, run_id, fresh_page(0), counters, store)
    live, ledger = counters.totals(FLOW, run_id), store.page_totals([run_id])[run_id].counts
    store.record_plan(run_id, 1, None)
    instance.add_run(
        dg.DagsterRun(job_name=f"{FLOW}_job", run_id=run_id, status=dg.DagsterRunStatus.FAILURE)
    )
    report = finalize_runs(instance, store, counters, {FLOW: FlowPolicy()})
    assert report.finalized == {run_id: "failed"}, report
    assert ledger.pending == 3
    mismatch = store.runs(run_id=run_id)[0].counter_mismatch
    assert (live, mismatch) == (ledger, None)


def test_a_lost_seen_hash_does_not_dispatch_duplicates(services: Services) -> None:
    store, counters, _ = services
    run_id = new_run(services)
    flow = Flow(name=FLOW, source=FixedPages(), key="id", handler=lambda batch: None)
    process_page(flow, run_id, fresh_page(0), counters, store)  # claims a, b, c
    counters.client().delete(run_key(FLOW, run_id, "seen"))
    process_page(flow, run_id, fresh_page(1), counters, store)  # c and a are duplicates
    counts = store.page_totals([run_id])[run_id].counts
    assert (counts.dispatched, counts.skipped) == (5, 2), counts
