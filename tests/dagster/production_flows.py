"""A flow module loadable by Dagster's multiprocess executor in its child processes.

``build_job`` is the reconstructable entry point: each step process calls it with the
same keyword arguments to rebuild the job, its flow and its resources.
"""

from __future__ import annotations

import dagster as dg

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from tests.flowkit import make_defs

FLOW_NAME = "mp_orders"


def fail_negative_amounts(batch: JobBatch) -> None:
    for record in batch:
        if int(record["amount"]) < 0:
            batch.fail(record, ValueError("negative amount"))


def build_flow(data_path: str) -> Flow:
    return Flow(
        name=FLOW_NAME,
        source=FileSource(data_path, page_size=100),
        key="id",
        handler=fail_negative_amounts,
        pages_per_step=3,
        max_failed_jobs=0.05,
    )


def build_definitions(database_url: str, redis_url: str, data_path: str) -> dg.Definitions:
    return make_defs([build_flow(data_path)], redis_url, database_url)


def build_job(database_url: str, redis_url: str, data_path: str) -> dg.JobDefinition:
    return build_definitions(database_url, redis_url, data_path).resolve_job_def(f"{FLOW_NAME}_job")
