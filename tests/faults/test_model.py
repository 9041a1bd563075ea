"""Model-based test of the accounting: random interleavings of page attempts, retries, job
outcomes, double acks, crashes, Redis loss and SCRIPT FLUSH drive the real process_pages on a
real Redis and a real ledger, and the real finalizer on an ephemeral Dagster instance,
against a small in-memory model. Nothing is faked; the handler (scripted by hypothesis) and
the fixed pages are the test's own.

Two steps of a run also interleave: each runs ``process_pages`` in its own thread, and
wrappers around ``LiveCounters.claim_page`` and ``Ledger.record_pages`` (``Hooked*``)
hold it before each page claim and before its pre-write until a drawn schedule gives it the
turn, with Redis lost (or not) just before each of those points. Only one thread runs at a
time, so the order is the schedule's and the run is deterministic.

Two profiles (tests/faults/model_profiles.py, docs/testing.md): the fast test replays the
same 40 examples on a SQLite ledger on every run; the deep test draws fresh random seeds on a
PostgreSQL ledger, a batch of examples per seed (each printed with the command that replays
it), until its time budget is spent: 50 s in ``make test``, more on demand."""

from __future__ import annotations

import itertools
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple, cast

import dagster as dg
import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, reproduce_failure, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from devservers import PostgresServer
from flow_assets.dispatch import JobBatch
from flow_assets.errors import HandlerError
from flow_assets.flow import Flow
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page, PageRef
from resources.counts import Counts
from resources.ledger import db
from resources.ledger.ledger import Ledger
from resources.ledger.records import PageRecord, PageTotals
from resources.live.counters import LiveCounters
from resources.live.keys import run_key, run_keys
from sensors.classify import RunSnapshot, RunState, Tolerance, classify
from sensors.finalizer import FlowPolicy, finalize_runs
from tests.counters_helpers import ttl_report
from tests.faults.model_profiles import MODEL_SUMMARY, DeepRun, deep_run
from tests.ledger_helpers import process_page

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

# What interleave_steps ran, tallied for the deep test.
SEQUENTIAL = {1: "one step", 2: "two steps in turn"}
INTERLEAVED = "two steps interleaved"
LOSSES = ("flushall", "delete_run_keys", "evict_meta")
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
    """Page ``index`` as a source would return it again: same content, new objects (each
    object also says which page it came from, for the handler's record of deliveries)."""
    records = [{**r, "page": index} if isinstance(r, dict) else r for r, _ in PAGES[index]]
    return Page(index=index, records=records, label=f"model page {index}")


class FixedPages:
    """A source over PAGES (the Flow needs one; process_page is given pages directly)."""

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        return [PageRef(index) for index in range(len(PAGES))]

    def fetch(self, ref: PageRef) -> Page:
        return fresh_page(ref.index)

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        return (fresh_page(index) for index in range(len(PAGES)))


def valid_keys(index: int) -> list[str]:
    return [key for _, key in PAGES[index] if key is not None]


@dataclass
class Model:
    """The accounting, from the rules alone: which page Redis and the ledger each give a key,
    what a page's latest attempt counted, and whether Redis currently holds the run."""

    owner: dict[str, int] = field(default_factory=dict)  # the ledger: first page pre-written
    seen: dict[str, int] = field(default_factory=dict)  # Redis: first page claimed since rebuilt
    latest: dict[int, Counts] = field(default_factory=dict)  # page -> latest attempt
    failed_keys: dict[int, set[str]] = field(default_factory=dict)  # page -> failed jobs
    crashed: set[int] = field(default_factory=set)  # pages whose latest row is not done
    redis_lost: bool = False
    mismatch_noted: bool = False

    def _restore(self) -> None:
        """Redis rebuilt (or realigned) from the ledger, and the loss noted on the run."""
        self.seen, self.redis_lost, self.mismatch_noted = dict(self.owner), False, True

    def claim(self, index: int) -> list[str]:
        """Page ``index``'s Redis claim: the keys Redis gives it, in page order."""
        if self.redis_lost:  # the claim finds the run lost, rebuilds it and says so
            self._restore()
        mine: list[str] = []
        for key in valid_keys(index):
            if self.seen.setdefault(key, index) == index and key not in mine:
                mine.append(key)
        return mine

    def prewrite(self, claims: Sequence[tuple[int, list[str]]]) -> dict[int, list[str]]:
        """A step's pre-write: each page keeps the keys the ledger gives it (first given,
        first served), its row pending; a page the ledger left with no job is done."""
        owned: dict[int, list[str]] = {}
        narrowed = False
        for index, keys in claims:
            owned[index] = [key for key in keys if self.owner.setdefault(key, index) == index]
            narrowed = narrowed or len(owned[index]) < len(keys)
            self.latest[index] = Counts(
                source=len(PAGES[index]),
                dispatched=len(owned[index]),
                skipped=len(valid_keys(index)) - len(owned[index]),
                rejected=len(PAGES[index]) - len(valid_keys(index)),
            )
            self.failed_keys[index] = set()
            emptied = len(owned[index]) < len(keys) and not owned[index]
            (self.crashed.discard if emptied else self.crashed.add)(index)
        if narrowed or self.redis_lost:  # realigned with the ledger, or rebuilt by the mirror
            self._restore()
        return owned

    def handle(self, owned: dict[int, list[str]], plan: Plan) -> Counts | None:
        """The handler on each pre-written page, in order; the step's counts (None: raises)."""
        total, raised = Counts(), False
        for index, mine in owned.items():
            crashes = plan.crash_at is not None and bool(mine)  # no jobs: no handler call
            if crashes and not plan.final:
                return None  # this page and the later ones stay pending; Dagster retries
            # A crash on the last attempt fails the jobs not yet reported; the page is done.
            reached = plan.crash_at if crashes and plan.crash_at is not None else len(mine)
            failed = set()
            for position, key in enumerate(mine):
                verbs = plan.verbs(position) if position < reached else ()
                if COMPLETE not in verbs and (FAIL in verbs or crashes):
                    failed.add(key)
            counts = replace(
                self.latest[index], completed=len(mine) - len(failed), failed=len(failed)
            )
            self.latest[index], self.failed_keys[index] = counts, failed
            self.crashed.discard(index)
            total, raised = total + counts, raised or crashes
        return None if raised else total

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


@dataclass(frozen=True)
class Step:
    """One page step: its pages, in order, and what its handler does on them."""

    name: str
    pages: tuple[int, ...]
    plan: Plan

    def points(self) -> list[tuple[str, str]]:
        """Where the step waits for its turn: before each page claim and the pre-write."""
        return [(self.name, f"claim {index}") for index in self.pages] + [(self.name, "prewrite")]


class Turns:
    """Hands the steps' threads their turns in ``order`` (one running at a time); before
    each turn, Redis loses the run if ``losses`` says so for that position."""

    def __init__(
        self,
        order: Sequence[tuple[str, str]],
        losses: Sequence[str | None],
        lose: Callable[[str], None],
    ) -> None:
        self.order, self.losses, self.lose = list(order), list(losses), lose
        self.position, self.holder = 0, ""
        self.finished: set[str] = set()
        self.cond = threading.Condition()

    def take(self, step: str, point: str) -> None:
        with self.cond:
            self._release(step)
            if not self.cond.wait_for(lambda: self._next() == (step, point), timeout=60):
                raise RuntimeError(f"{step} never got its turn at {point}: {self.order}")
            self.holder, loss = step, self.losses[self.position]
        if loss is not None:
            self.lose(loss)

    def done(self, step: str) -> None:
        with self.cond:
            self._release(step)
            self.finished.add(step)
            self.cond.notify_all()

    def _release(self, step: str) -> None:
        if self.holder == step:
            self.holder, self.position = "", self.position + 1
            self.cond.notify_all()

    def _next(self) -> tuple[str, str] | None:
        while self.position < len(self.order) and self.order[self.position][0] in self.finished:
            self.position += 1
        return self.order[self.position] if self.position < len(self.order) else None


class Hooked:
    """A resource as ``process_pages`` uses it, for one step: what it does not override
    goes straight through."""

    def __init__(self, inner: Any, turns: Turns, step: str) -> None:
        self._inner, self._turns, self._step = inner, turns, step
        self._claimed: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class HookedCounters(Hooked):
    """``LiveCounters`` waiting for the step's turn before each page's first claim."""

    def claim_page(self, flow: str, run_id: str, page_index: int, keys: Sequence[str]) -> Any:
        if page_index not in self._claimed:  # not the claim repeated after a rebuild
            self._claimed.add(page_index)
            self._turns.take(self._step, f"claim {page_index}")
        return self._inner.claim_page(flow, run_id, page_index, keys)


class HookedStore(Hooked):
    """``Ledger`` waiting for the step's turn before the pre-write."""

    def record_pages(self, run_id: str, pages: Sequence[PageRecord]) -> Any:
        self._turns.take(self._step, "prewrite")
        return self._inner.record_pages(run_id, pages)


class Services(NamedTuple):
    """The real things a machine runs on, built by the test's fixtures."""

    store: Ledger
    counters: LiveCounters
    instance: dg.DagsterInstance


class AccountingMachine(RuleBasedStateMachine):
    """One flow run per example; rules are the faults and attempts, invariants the checks."""

    services: Services  # set by bind()
    tally: Counter[str]  # what the examples exercised, set by bind()

    def __init__(self) -> None:
        super().__init__()
        self.tally["examples"] += 1
        self.store, self.counters = self.services.store, self.services.counters
        self.run_id = str(uuid.uuid4())
        self.model = Model()
        self.tolerance: int | float = 0
        self.plans = threading.local()  # each step's thread runs the handler with its plan
        self.delivered: dict[str, set[int]] = {}  # key -> pages whose handler got it
        self.flow = Flow(name=FLOW, source=FixedPages(), key="id", handler=self._handle)
        # What the flow job's plan op does when a run starts.
        self.store.start_run(self.run_id, FLOW, None, datetime.now(timezone.utc))
        self.counters.start_run(FLOW, self.run_id)

    def _handle(self, batch: JobBatch) -> None:
        plan: Plan = self.plans.current
        for key, record in batch.items():
            self.delivered.setdefault(key, set()).add(record["page"])
        for position, (key, record) in enumerate(batch.items()):
            if position == plan.crash_at:
                raise HandlerCrash(f"handler died before job {position} of the page")
            for verb in plan.verbs(position):
                job = key if plan.by_key else record
                if verb == COMPLETE:
                    batch.complete(job)
                else:
                    batch.fail(job, ValueError(f"job {key} failed"))
        if plan.crash_at is not None:
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

    @rule(data=st.data())
    def interleave_steps(self, data: st.DataObject) -> None:
        """One or two steps of 1-2 pages each (no page in both), their claims and pre-writes
        interleaved in a drawn order, Redis lost or not just before each of those points."""
        order = data.draw(st.permutations(range(len(PAGES))), "page order")
        sizes = data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=2), "step sizes")
        steps, start = [], 0
        for name, size in zip("AB", sizes, strict=False):
            steps.append(Step(name, tuple(order[start : start + size]), data.draw(plans, name)))
            start += size
        turns = [name for step in steps for name, _ in step.points()]
        turns = data.draw(st.permutations(turns), "turns")
        points = {step.name: iter(step.points()) for step in steps}
        schedule = [next(points[name]) for name in turns]
        switches = sum(a != b for a, b in itertools.pairwise(turns))
        self.tally[INTERLEAVED if switches > 1 else SEQUENTIAL[len(steps)]] += 1
        losses = data.draw(
            st.lists(
                st.sampled_from((None, None, None, *LOSSES)),
                min_size=len(schedule),
                max_size=len(schedule),
            ),
            "losses",
        )
        self._run_steps(steps, schedule, losses)

    @rule(how=st.sampled_from(LOSSES))
    def lose_redis_state(self, how: str) -> None:
        self._drop(how)
        self.model.redis_lost = True

    @rule()
    def script_flush(self) -> None:
        self.counters.client().script_flush()

    def _drop(self, how: str) -> None:
        """Redis loses the run (the model is told by the caller)."""
        client = self.counters.client()
        if how == "flushall":
            client.flushall()
        elif how == "delete_run_keys":
            client.delete(*run_keys(FLOW, self.run_id))
        else:  # the sentinel alone evicted: the run counts as lost and is rebuilt whole
            client.delete(run_key(FLOW, self.run_id, "meta"))

    def _attempt(self, index: int, plan: Plan) -> None:
        """One page as its own step, nothing in between (the model alone, no threads)."""
        self.plans.current = plan
        step = Step("A", (index,), plan)
        expected = self._expect([step], step.points(), [None, None])
        page = fresh_page(index)
        if expected["A"] is None:
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
            assert got == expected["A"], f"page {index}: returned {got}, model {expected['A']}"

    def _expect(
        self,
        steps: Sequence[Step],
        schedule: Sequence[tuple[str, str]],
        losses: Sequence[str | None],
    ) -> dict[str, Counts | None]:
        """Walk the schedule through the model: each step's counts (None: it raises)."""
        by_name = {step.name: step for step in steps}
        claims: dict[str, list[tuple[int, list[str]]]] = {step.name: [] for step in steps}
        expected: dict[str, Counts | None] = {}
        pending = {step.name: iter(step.pages) for step in steps}
        for (name, point), loss in zip(schedule, losses, strict=True):
            self.model.redis_lost = self.model.redis_lost or loss is not None
            if point == "prewrite":
                owned = self.model.prewrite(claims[name])
                expected[name] = self.model.handle(owned, by_name[name].plan)
            else:
                index = next(pending[name])
                claims[name].append((index, self.model.claim(index)))
        return expected

    def _run_steps(
        self,
        steps: Sequence[Step],
        schedule: Sequence[tuple[str, str]],
        losses: Sequence[str | None],
    ) -> None:
        """Run each step's ``process_pages`` in its own thread, taking turns as scheduled;
        compare what each returned or raised with the model."""
        expected = self._expect(steps, schedule, losses)
        turns = Turns(schedule, losses, self._drop)  # the model applied them in _expect
        outcomes: dict[str, Counts | BaseException] = {}

        def run(step: Step) -> None:
            self.plans.current = step.plan
            counters = cast(LiveCounters, HookedCounters(self.counters, turns, step.name))
            store = cast(Ledger, HookedStore(self.store, turns, step.name))
            pages = [fresh_page(index) for index in step.pages]
            try:
                outcomes[step.name] = process_pages(
                    self.flow, self.run_id, pages, counters, store, final_attempt=step.plan.final
                )
            except BaseException as exc:  # compared with the model below
                outcomes[step.name] = exc
            finally:
                turns.done(step.name)

        threads = [threading.Thread(target=run, args=(step,)) for step in steps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)  # a hang guard, not a timing assertion
        assert not any(thread.is_alive() for thread in threads), "a step never finished"
        for step in steps:
            got, want = outcomes[step.name], expected[step.name]
            if want is None:
                assert isinstance(got, HandlerError), f"step {step}: {got!r}, model: it raises"
                assert "HandlerCrash: handler died" in str(got)
            elif isinstance(got, BaseException):
                raise AssertionError(f"step {step} raised, model: {want}") from got
            else:
                assert got == want, f"step {step}: returned {got}, model {want}"

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
        # At most once per key: only the page that owns it ever got it (its retries too).
        assert {key: {model.owner[key]} for key in self.delivered} == self.delivered
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
        assert seen == {key: str(page) for key, page in self.model.seen.items()}
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
        if self.model.crashed:
            # The Dagster run succeeded, so the retry policy re-ran every crashed page, and
            # they finished: those with pending jobs, and also an empty page a crash left
            # pending behind it in its step (no pending job: nothing above held the run).
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
        assert ttl_report(self.counters, FLOW, self.run_id) == {}, "run keys left after publish"

    def _finalize(self) -> str | None:
        """One finalizer pass; this run's final status, or None if it is left waiting."""
        policy = FlowPolicy(Tolerance(self.tolerance), DEADLINE)
        report = finalize_runs(self.services.instance, self.store, self.counters, {FLOW: policy})
        status = report.finalized.get(self.run_id)
        assert (status is None) == (self.run_id in report.waiting), report
        return status


def bind(services: Services, tally: Counter[str] | None = None) -> type[AccountingMachine]:
    """The machine class wired to this test's servers (state machines take no fixtures)."""
    attributes = {"services": services, "tally": Counter() if tally is None else tally}
    return type("AccountingModel", (AccountingMachine,), attributes)


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
        store = Ledger(url=f"sqlite:///{tmp_path / 'ledger.db'}")
        yield Services(store, LiveCounters(url=redis_url), instance)


def test_accounting_matches_the_model(services: Services) -> None:
    run_state_machine_as_test(bind(services), settings=MODEL_SETTINGS)


@pytest.mark.model_deep
def test_accounting_matches_the_model_deep(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same machine on a PostgreSQL ledger, with fresh random seeds: one batch of
    examples per seed, each in a fresh database, until the time budget (or the example cap)
    is spent. Each seed is printed with the command that replays its batch exactly."""
    run = deep_run()
    if run is None:
        pytest.skip("FLOW_MODEL_PROFILE=fast skips the deep model test")
    # The servers only now: a skipped test starts none.
    redis_url = cast(str, request.getfixturevalue("redis_url"))
    postgres_server = cast(PostgresServer, request.getfixturevalue("postgres_server"))
    summary = request.config.stash.setdefault(MODEL_SUMMARY, [])
    tally: Counter[str] = Counter()
    seeds: list[int] = []
    postgres_server.start()  # a fault test that failed halfway may have left it stopped
    print(f"model test, deep: {run.describe()}", flush=True)
    started = time.monotonic()
    while True:
        spent = time.monotonic() - started
        if seeds and (
            run.replaying
            or spent + spent / len(seeds) > run.budget_s
            or 0 < run.max_examples <= tally["examples"]
        ):
            break
        seeds.append(run.new_seed())
        print(f"batch {len(seeds)}: seed {seeds[-1]}", flush=True)
        try:
            ledger = tmp_path / f"batch{len(seeds)}.db" if run.sqlite else None
            run_deep_batch(run, seeds[-1], redis_url, postgres_server, ledger, tally)
        except BaseException as exc:
            what = "example" if run.blob else f"seed {seeds[-1]} (batch {len(seeds)})"
            note = f"The deep model test failed on {what}. Replay: {run.replay_command(seeds[-1])}"
            summary.append(note)  # at the end of the session's output
            if sys.version_info >= (3, 11):
                exc.add_note(note)  # under the error and the failing steps
            else:
                print(note, flush=True)
            raise
    spent = time.monotonic() - started
    ran = ", ".join(f"{tally[what]} {what}" for what in (*SEQUENTIAL.values(), INTERLEAVED))
    summary.append(
        f"{run.describe()}: {len(seeds)} seed(s), {tally['examples']} examples in {spent:.1f} s; "
        f"interleave_steps ran {ran}"
    )
    summary.append(f"seeds: {' '.join(map(str, seeds))}")
    # ~1.7 per example: none in 25 examples would mean the rule no longer runs.
    if tally["examples"] >= 25:
        assert tally[INTERLEAVED], f"no two steps ever interleaved: {tally}"


def run_deep_batch(
    run: DeepRun,
    batch_seed: int,
    redis_url: str,
    server: PostgresServer,
    sqlite_ledger: Path | None,
    tally: Counter[str],
) -> None:
    """One hypothesis run of ``run.batch`` examples drawn from ``batch_seed``, on a fresh
    PostgreSQL database (dropped after; a fresh SQLite file with FLOW_MODEL_LEDGER=sqlite),
    a flushed Redis and a new Dagster instance: the batch depends on its seed alone, so the
    seed replays it."""
    name = f"model_{uuid.uuid4().hex[:16]}"
    url = f"sqlite:///{sqlite_ledger}" if sqlite_ledger else server.create_database(name)
    try:
        counters = LiveCounters(url=redis_url)
        counters.client().flushall()
        with dg.DagsterInstance.ephemeral() as instance:
            store = Ledger(url=url)
            dialect = "sqlite" if sqlite_ledger else "postgresql"
            assert store.engine().dialect.name == dialect, store.redacted_url()
            machine = seed(batch_seed)(bind(Services(store, counters, instance), tally))
            if run.blob is not None:
                machine = reproduce_failure(hypothesis.__version__, run.blob.encode())(machine)
            deep_settings = settings(
                MODEL_SETTINGS,
                max_examples=run.batch,
                stateful_step_count=run.steps,
                derandomize=False,  # the batch's seed decides
                print_blob=True,  # the failing example, for FLOW_MODEL_BLOB
                phases=[phase for phase in Phase if run.shrink or phase != Phase.shrink],
            )
            run_state_machine_as_test(machine, settings=deep_settings)
    finally:
        db.dispose_engines()
        if sqlite_ledger is None:
            server.drop_database(name)


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
