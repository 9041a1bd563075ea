"""Test-only shorthands over ``LiveCounters`` (production code calls ``record_pages``)."""

from __future__ import annotations

from resources.counts import Counts
from resources.live.counters import LiveCounters
from resources.live.keys import run_keys


def record_page(
    counters: LiveCounters, flow: str, run_id: str, page_index: int, counts: Counts
) -> bool:
    """Store one page's counts, replacing its earlier ones; False when Redis lost the run."""
    return counters.record_pages(flow, run_id, [(page_index, counts)])


def ttl_report(counters: LiveCounters, flow: str, run_id: str) -> dict[str, int]:
    """Seconds to live of each existing key of the run (-1: no TTL)."""
    keys = run_keys(flow, run_id)
    pipe = counters.client().pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    ttls = pipe.execute()
    return {key: int(ttl) for key, ttl in zip(keys, ttls, strict=True) if ttl != -2}
