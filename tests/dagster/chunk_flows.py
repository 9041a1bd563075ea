"""Flows over CSV (read in order: chunks hold records) and JSON Lines (random access: chunks
hold page refs), reconstructable for ``dg.execute_job`` (a re-execution from failure needs
it). ``build_job`` rebuilds them from plain keyword arguments.

The handler fails the page holding ``BROKEN_KEY`` while the file ``broken_path`` exists (a
downstream outage the test ends by deleting the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from tests.flowkit import make_defs

FLOW_NAME = "chunked_orders"
RECORDS = 120
BROKEN_KEY = "o100"
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}


def write_records(data_dir: Path, marker: str) -> None:
    """The same records as ``orders.csv`` and ``orders.jsonl``; every note holds ``marker``."""
    rows = [{"id": f"o{n}", "note": f"{marker}-{n}"} for n in range(RECORDS)]
    lines = ["id,note", *(f"{row['id']},{row['note']}" for row in rows)]
    (data_dir / "orders.csv").write_text("\n".join(lines) + "\n")
    (data_dir / "orders.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_flow(data_dir: str, broken_path: str, file_format: str) -> Flow:
    def handler(batch: JobBatch) -> None:
        if BROKEN_KEY in batch.keys and Path(broken_path).exists():
            raise ConnectionError("downstream is down")

    return Flow(
        name=FLOW_NAME,
        source=FileSource(str(Path(data_dir) / f"orders.{file_format}"), page_size=20),
        key="id",
        handler=handler,
        pages_per_step=2,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )


def build_definitions(**kwargs: Any) -> dg.Definitions:
    database_url, redis_url = kwargs.pop("database_url"), kwargs.pop("redis_url")
    return make_defs([build_flow(**kwargs)], redis_url, database_url)


def build_job(**kwargs: Any) -> dg.JobDefinition:
    return build_definitions(**kwargs).resolve_job_def(f"{FLOW_NAME}_job")
