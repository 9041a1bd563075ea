"""Reconstructable flows for the recovery-path tests (``test_recovery_paths.py``).

``build_job`` is what ``dg.execute_job`` (and so a re-execution from failure) rebuilds the
job from: a flow over a JSONL file of ``RECORDS`` unique records, one page per
``PAGE_SIZE``, whose handler interrupts the run once on ``fault_page`` (the marker file,
written first, lets the re-execution through):

* ``kill``: SIGKILL of the process running the page, with the in-process executor the
  orchestrator itself: the Dagster run stays STARTED until run monitoring fails it;
* ``cancel``: what Dagster's terminate does (CANCELING, then SIGINT to the orchestrator),
  from a step process of the multiprocess executor, which then starts no further step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import dagster as dg

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from tests.flowkit import make_defs

FLOW_NAME = "recovering"
RECORDS = 60
PAGE_SIZE = 5  # 12 pages
PAGES_PER_STEP = 2  # 6 steps: [0-1] [2-3] ... [10-11]
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(RECORDS)))
    return path


# One step process at a time, spawned by the orchestrator (its parent).
MULTIPROCESS = {
    "execution": {"config": {"multiprocess": {"start_method": {"spawn": {}}, "max_concurrent": 1}}}
}
RUN_CONFIG = {"kill": IN_PROCESS, "cancel": MULTIPROCESS}


def _interrupt(fault: str, instance: dg.DagsterInstance) -> None:
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    started = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
    instance.report_run_canceling(instance.get_runs(started, limit=1)[0])
    os.kill(os.getppid(), signal.SIGINT)  # the orchestrator terminates this step process
    time.sleep(60)


def build_flow(data_path: str, marker_path: str, fault: str, fault_page: int) -> Flow:
    marker = Path(marker_path)

    def handler(batch: JobBatch) -> None:
        if int(batch.records[0]["id"]) // PAGE_SIZE == fault_page and not marker.exists():
            marker.write_text(str(os.getpid()))
            with dg.DagsterInstance.get() as instance:
                _interrupt(fault, instance)

    return Flow(
        name=FLOW_NAME,
        source=FileSource(data_path, page_size=PAGE_SIZE),
        key="id",
        handler=handler,
        pages_per_step=PAGES_PER_STEP,
        retry_policy=dg.RetryPolicy(max_retries=0),
    )


def build_definitions(
    database_url: str, redis_url: str, data_path: str, marker_path: str, fault: str, fault_page: int
) -> dg.Definitions:
    flow = build_flow(data_path, marker_path, fault, fault_page)
    return make_defs([flow], redis_url, database_url)


def build_job(
    database_url: str, redis_url: str, data_path: str, marker_path: str, fault: str, fault_page: int
) -> dg.JobDefinition:
    defs = build_definitions(database_url, redis_url, data_path, marker_path, fault, fault_page)
    return defs.resolve_job_def(f"{FLOW_NAME}_job")


def execute(kwargs_json: str) -> None:
    """Subprocess entry: run the job once (the handler interrupts it)."""
    kwargs = json.loads(kwargs_json)
    job = dg.build_reconstructable_job(
        "tests.faults.recovery_flows",
        "build_job",
        reconstructable_kwargs=kwargs,
        reconstructor_working_directory=os.getcwd(),
    )
    with dg.DagsterInstance.get() as instance:
        dg.execute_job(job, instance=instance, run_config=RUN_CONFIG[kwargs["fault"]])
