"""The handler of the settle tests (RQ workers load it through ``rq_flows.WORKER_FLOWS``;
inline flows call it in-process).

Records say what the handler does with them, so workers (other processes) need no other
input: ``wait_for`` (write the pid to the ``started`` path, then block until the
``wait_for`` path exists: a long job the test finalizes the run under), ``fail_while``
(fail the job while that path exists), ``raise_while`` (raise, failing the page step,
while that path exists). Every key handled is appended to ``$FLOW_TEST_HANDLED``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flow_assets.dispatch import JobBatch

MAX_WAIT_SECONDS = 300.0


def handle(batch: JobBatch) -> None:
    for key, record in batch.items():
        if record.get("raise_while") and os.path.exists(record["raise_while"]):
            raise ConnectionError(f"downstream is down for {key}")
        if record.get("wait_for"):
            Path(record["started"]).write_text(str(os.getpid()))
            give_up = time.monotonic() + MAX_WAIT_SECONDS
            while not os.path.exists(record["wait_for"]) and time.monotonic() < give_up:
                time.sleep(0.05)
        if record.get("fail_while") and os.path.exists(record["fail_while"]):
            batch.fail(record, ValueError(f"downstream refused {key}"))
    handled = os.environ.get("FLOW_TEST_HANDLED")
    if handled:
        with open(handled, "a") as out:
            out.write("".join(f"{key}\n" for key in batch.keys))


def handled_keys(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def write_jsonl(records: Iterable[Mapping[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
