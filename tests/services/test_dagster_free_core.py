"""The ledger and the live counters run in a process where Dagster cannot be imported.

The RQ worker, the CLI and the bench use ``Ledger`` and ``LiveCounters`` directly; they must
not need Dagster (issue 11, item 2). A child process blocks every ``dagster`` import, then
drives one page of a run through ``FlowRun`` against the real Redis server and a SQLite
ledger, as a page step does, and prints what the ledger and Redis hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from resources.counts import Counts

CHILD = r"""
import json, sys

class BlockDagster:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dagster" or name.startswith("dagster_"):
            raise ImportError(f"Dagster is blocked in this process: {name}")

sys.meta_path.insert(0, BlockDagster())
from datetime import datetime, timezone

import flow_assets.rq.worker  # noqa: F401  the worker's own modules
from resources.counts import Counts
from resources.flow_run import FlowRun
from resources.ledger.ledger import Ledger
from resources.ledger.records import PageRecord
from resources.live.counters import LiveCounters

ledger, counters = Ledger(url=sys.argv[1]), LiveCounters(url=sys.argv[2])
run = FlowRun("core_only", "run-1", ledger, counters)
ledger.start_run(run.run_id, run.flow_name, None, datetime.now(timezone.utc))
ledger.record_plan(run.run_id, 1, None)
counters.start_run(run.flow_name, run.run_id)
owned = run.claim_page(0, ["a", "b", "a"])
keys = [key for key, mine in zip(["a", "b", "a"], owned) if mine]
counts = Counts(source=3, dispatched=2, skipped=1, completed=2)
[page] = run.prewrite([PageRecord(0, counts, "dispatched", keys)])
run.finish([PageRecord(0, counts, "done", page.claimed_keys)])
print(json.dumps({
    "owned": owned,
    "ledger": ledger.page_totals([run.run_id])[run.run_id].counts.as_tuple(),
    "redis": counters.totals_many([(run.flow_name, run.run_id)]).popitem()[1].as_tuple(),
    "dagster_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "dagster"),
}))
"""


def test_a_page_runs_through_the_core_without_dagster(redis_url: str, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, database, redis_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["owned"] == [True, True, False]
    expected = list(Counts(source=3, dispatched=2, skipped=1, completed=2).as_tuple())
    assert out["ledger"] == expected
    assert out["redis"] == expected
    assert out["dagster_loaded"] == []
