"""Flows for the ``flowctl`` exit-code and ``rerun`` tests, which run the real console script
in subprocesses (``flowctl run ... -m tests.dagster.cli_flows``).

Everything comes from the environment: ``CLI_FLOWS_DIR`` holds the data files the test
wrote (``unique.jsonl``: ids 0..29; ``dups.jsonl``: ids 0..24 plus 5 repeated), and while
the file ``$CLI_FLOWS_DIR/marker`` exists the handler of ``exit_failing`` raises on the page
holding id 15 (a downstream outage the test ends by deleting the file). With
``$CLI_FLOWS_DIR/hang`` present, ``exit_slow`` writes ``started`` and waits for the file to
go away (so a test can interrupt the run mid-step).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from flow_assets.build import build_definitions
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource

DIR = Path(os.environ.get("CLI_FLOWS_DIR", "/nonexistent"))
UNIQUE = [{"id": i} for i in range(30)]
DUPS = [{"id": i} for i in range(25)] + [{"id": i} for i in range(5)]
NO_RETRY = dg.RetryPolicy(max_retries=0)


def write_data(directory: Path) -> None:
    for name, records in (("unique.jsonl", UNIQUE), ("dups.jsonl", DUPS)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def fail_while_marked(batch: JobBatch) -> None:
    if "15" in batch.keys and (DIR / "marker").exists():
        raise ConnectionError("downstream is down (page holding id 15)")


def wait_while_hung(batch: JobBatch) -> None:
    if (DIR / "hang").exists():
        (DIR / "started").touch()
        while (DIR / "hang").exists():
            time.sleep(0.05)


def accept(batch: JobBatch) -> None:
    """The RQ flow's handler (no worker runs in these tests: its jobs stay pending)."""


def _flow(name: str, data: str, handler: Callable[[JobBatch], None], **options: Any) -> Flow:
    return Flow(
        name=name,
        source=FileSource(str(DIR / data), page_size=10),
        key="id",
        handler=handler,
        pages_per_step=1,
        retry_policy=NO_RETRY,
        **options,
    )


defs = build_definitions(
    [
        _flow("exit_ok", "unique.jsonl", lambda batch: None),
        _flow("exit_partial", "dups.jsonl", lambda batch: None),
        _flow("exit_failing", "unique.jsonl", fail_while_marked),
        _flow("exit_slow", "unique.jsonl", wait_while_hung),
        _flow("exit_rq", "unique.jsonl", accept, dispatch="rq"),
    ]
)
