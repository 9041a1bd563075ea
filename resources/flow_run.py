"""One flow run's two stores, and the one rule between them: the SQL ledger decides, Redis
is its cache (fast dedup claims and live totals), mirrored after each ledger write and
rebuilt from the ledger whenever it lost the run.

Redis may lose the run between a page's claim and its pre-write, and a rebuild from the
ledger cannot know that claim, so a later page may get the same key. So a loss is noted on
the run *before* the ledger is read: from the note on, every pre-write claims its keys in
the ledger (``Ledger.record_pages``), and a key another page owns there is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.records import PageRecord
from resources.live.counters import LiveCounters

log = logging.getLogger(__name__)
LOST_MID_RUN = "Redis lost the run's counters mid-run; rebuilt them from the SQL ledger"


@dataclass(frozen=True)
class FlowRun:
    """A flow run as its steps write it: the ledger first, then its Redis mirror."""

    flow_name: str
    run_id: str
    store: Ledger
    counters: LiveCounters

    def claim_page(self, page_index: int, keys: list[str]) -> list[bool]:
        """Claim a page's keys in Redis (rebuilt first if it lost the run): which it owns."""
        owned = self.counters.claim_page(self.flow_name, self.run_id, page_index, keys)
        if owned is None:
            self.rebuild()
            owned = self.counters.claim_page(self.flow_name, self.run_id, page_index, keys)
        if owned is None:
            raise RuntimeError(
                f"flow {self.flow_name!r} run {self.run_id}: Redis lost the run's state again"
                " right after it was rebuilt from the ledger; check the Redis server's"
                " maxmemory policy and restarts"
            )
        return owned

    def claim_in_flow(self, page_index: int, keys: list[str], owned: list[bool]) -> list[bool]:
        """``dedup="flow"``: narrow the run's claim to keys no other run of the flow
        dispatched (between pages of the run, the pre-write decides)."""
        candidates = [key for key, mine in zip(keys, owned, strict=True) if mine]
        claimed = self.store.claim_flow_keys(self.flow_name, self.run_id, page_index, candidates)
        flags = iter(claimed)
        return [mine and next(flags) for mine in owned]

    def prewrite(self, pages: Sequence[PageRecord]) -> list[PageRecord]:
        """Write pages before their handler runs; the keys the ledger gave each (it may
        give fewer than Redis did, if Redis lost the run meanwhile: ``realign``)."""
        return self.store.record_pages(self.run_id, pages)

    def finish(self, pages: Sequence[PageRecord]) -> None:
        """Record the outcomes of pages pre-written in this attempt, then mirror them."""
        if pages:
            self.store.finish_pages(self.run_id, pages)
            self.mirror(pages)

    def mirror(self, pages: Sequence[PageRecord]) -> None:
        """Mirror pages the ledger holds in the live counters (rebuilt if Redis lost them)."""
        counts = [(page.page_index, page.counts) for page in pages]
        if not self.counters.record_pages(self.flow_name, self.run_id, counts):
            self.rebuild()

    def dispatch_page(
        self, page: PageRecord, job_ids: Mapping[str, str]
    ) -> tuple[PageRecord, set[str]]:
        """``dispatch="rq"``: write a page and its pending jobs, the ledger's page and the
        keys still pending (before the jobs are enqueued, so every ack finds its job)."""
        return self.store.record_async_page(self.run_id, page, job_ids)

    def mirror_dispatched(self, page_index: int, counts: Counts) -> None:
        """Mirror a dispatched page's counts (the ledger holds it: a lost run is rebuilt)."""
        if not self.counters.record_dispatched_page(
            self.flow_name, self.run_id, page_index, counts
        ):
            self.rebuild()

    def rebuild(self) -> None:
        """Redis lost the run: restore its dedup claims and live totals from the ledger.

        The loss is noted on the run *before* the ledger is read: a pre-write that did not
        see the note committed before it, so this read has its keys. (A run reopened after
        its finalization is restored without a note: ``restore_reopened``.)"""
        log.warning(
            "flow %s run %s: Redis lost the run's state; rebuilding it from the SQL ledger",
            self.flow_name,
            self.run_id,
        )
        self.store.note_counter_mismatch(self.run_id, LOST_MID_RUN)
        self._restore(force=False)

    def restore_reopened(self, revision: int) -> None:
        """A run reopened after its finalization (at ``revision``): rewrite Redis from the
        ledger once, whatever it holds (the finalization removed the keys, or they outlived
        it while reopening counted late outcomes in the ledger), unless a step of the
        re-execution restored it already (it may have claimed keys since). Not a loss: no
        note; the ledger decides every key of a reopened run anyway."""
        if self.counters.restored_for(self.flow_name, self.run_id) == revision:
            return  # the usual case for every step but the first: no ledger read
        claims, counts = self.store.claimed_keys(self.run_id), self.store.page_counts(self.run_id)
        self.counters.rebuild(self.flow_name, self.run_id, claims, counts, restore_of=revision)

    def realign(self) -> None:
        """Redis gave a page keys the ledger gave another: rewrite its claims from the ledger.

        Forced, since Redis holds the run (rebuilt from an older snapshot of the ledger);
        without it a retry of the ledger's owner would find the key taken in Redis. If
        another step rewrites the run meanwhile, Redis keeps that rewrite, as the ledger
        decides anyway.
        """
        log.warning(
            "flow %s run %s: Redis gave pages keys the ledger gave other pages (it lost the"
            " run mid-step); realigning its claims with the SQL ledger",
            self.flow_name,
            self.run_id,
        )
        self.store.note_counter_mismatch(self.run_id, LOST_MID_RUN)  # noted by the loss
        self._restore(force=True)

    def _restore(self, *, force: bool) -> None:
        claims, counts = self.store.claimed_keys(self.run_id), self.store.page_counts(self.run_id)
        self.counters.rebuild(self.flow_name, self.run_id, claims, counts, force=force)
