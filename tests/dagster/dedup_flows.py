"""A dedup="flow" flow over JSONL partitions, reconstructable for ``dg.execute_job`` (which a
re-execution from failure needs). ``build_job`` rebuilds it from plain keyword arguments.

The handler refuses a page holding ``BROKEN_KEY`` while the file ``broken_path`` exists
(a downstream outage the test ends by deleting the file; with ``fail_once`` the handler
deletes it itself, so a step retry succeeds), and records every key it handled in
``handled_path``, one per line, so the test sees what each attempt really dispatched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from tests.flowkit import make_defs

FLOW_NAME = "incremental_orders"
PAGE_SIZE = 50
PARTITIONS = dg.StaticPartitionsDefinition(["day1", "day2", "day3"])
BROKEN_KEY = "o260"
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}


def write_partition(data_dir: Path, partition: str, ids: Sequence[str]) -> None:
    lines = (json.dumps({"id": key, "amount": n}) + "\n" for n, key in enumerate(ids))
    (data_dir / f"{partition}.jsonl").write_text("".join(lines))


def handled_keys(handled_path: str) -> list[str]:
    path = Path(handled_path)
    return path.read_text().split() if path.exists() else []


def build_flow(
    data_dir: str,
    broken_path: str,
    handled_path: str,
    dedup: str = "flow",
    fail_once: bool = False,
    retries: int = 0,
) -> Flow:
    def handler(batch: JobBatch) -> None:
        broken = Path(broken_path)
        if BROKEN_KEY in batch.keys and broken.exists():
            if fail_once:
                broken.unlink()
            raise ConnectionError(f"downstream is down (page holding {BROKEN_KEY})")
        with open(handled_path, "a") as out:
            out.write("".join(f"{key}\n" for key in batch.keys))

    return Flow(
        name=FLOW_NAME,
        source=FileSource(str(Path(data_dir) / "{partition}.jsonl"), page_size=PAGE_SIZE),
        key="id",
        handler=handler,
        partitions=PARTITIONS,
        pages_per_step=2,
        retry_policy=dg.RetryPolicy(max_retries=retries),
        dedup=dedup,
    )


def build_definitions(**kwargs: Any) -> dg.Definitions:
    database_url, redis_url = kwargs.pop("database_url"), kwargs.pop("redis_url")
    return make_defs([build_flow(**kwargs)], redis_url, database_url)


def build_job(**kwargs: Any) -> dg.JobDefinition:
    return build_definitions(**kwargs).resolve_job_def(f"{FLOW_NAME}_job")
