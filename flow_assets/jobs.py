"""The Dagster objects of one flow: a fanned-out job, its schedule, its asset and check.

Shape of the job ``<flow>_job``::

    <flow>_plan  --(one DynamicOutput per chunk of pages)-->  <flow>_pages (mapped)
                 --collect-->  <flow>_collect (marks extraction done)

A chunk holds ``pages_per_step`` page refs (random-access sources: each step fetches its
pages) or pages already read (sequential sources: the plan op reads them in order), so
Dagster's per-step cost is paid once per chunk, not once per page.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from typing import TypeVar

import dagster as dg

from flow_assets.flow import Flow
from flow_assets.heartbeat import heartbeat, heartbeat_interval
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page, PageRef
from resources.metrics_store import MetricsStore
from resources.page_ranges import missing_pages_text
from resources.redis_counters import RedisCounters

COUNTERS_KEY = "redis_counters"
STORE_KEY = "metrics_store"
T = TypeVar("T")
# Dagster's tags for re-execution groups (dagster._core.storage.tags, not public API).
ROOT_RUN_ID_TAG = "dagster/root_run_id"
PARENT_RUN_ID_TAG = "dagster/parent_run_id"


@dataclass(frozen=True)
class PageChunk:
    """The pages one mapped step processes: refs to fetch, or pages already read."""

    refs: tuple[PageRef, ...] = field(default_factory=tuple)
    pages: tuple[Page, ...] = field(default_factory=tuple)

    @property
    def mapping_key(self) -> str:
        indexes = [p.index for p in self.refs or self.pages]
        return f"pages_{indexes[0]}_{indexes[-1]}"

    def __len__(self) -> int:
        return len(self.refs) + len(self.pages)


def build_flow_job(flow: Flow) -> dg.JobDefinition:
    """The flow's job: plan pages, process chunks in mapped steps, collect."""
    tags = {"flow/name": flow.name}

    @dg.op(
        name=f"{flow.name}_plan",
        out=dg.DynamicOut(PageChunk),
        required_resource_keys={COUNTERS_KEY, STORE_KEY},
        description=f"Plan the pages of {flow.source} and fan them out in chunks.",
        tags=tags,
    )
    def plan(context: dg.OpExecutionContext) -> Iterator[dg.DynamicOutput[PageChunk]]:
        partition_key = context.partition_key if context.has_partition_key else None
        store: MetricsStore = getattr(context.resources, STORE_KEY)
        counters: RedisCounters = getattr(context.resources, COUNTERS_KEY)
        run_id = flow_run_id(context)
        policy = flow.run_policy(_code_location(context.run))
        store.start_run(run_id, flow.name, partition_key, datetime.now(timezone.utc), policy)
        counters.start_run(flow.name, run_id)
        pages_total, reported_total = 0, None
        for chunk in _chunks(flow, partition_key):
            pages_total += len(chunk)
            reported_total = _reported_total(chunk) or reported_total
            yield dg.DynamicOutput(chunk, mapping_key=chunk.mapping_key)
        # Dagster starts the mapped steps once this op has returned: the plan is in the
        # ledger before any page is, and extraction is done when each page has its row.
        store.record_plan(run_id, pages_total, reported_total)

    @dg.op(
        name=f"{flow.name}_pages",
        required_resource_keys={COUNTERS_KEY, STORE_KEY},
        retry_policy=flow.retry_policy,
        description="Validate, dedup and dispatch the records of a chunk of pages.",
        tags=tags,
    )
    def process(context: dg.OpExecutionContext, chunk: PageChunk) -> int:
        store: MetricsStore = getattr(context.resources, STORE_KEY)
        counters: RedisCounters = getattr(context.resources, COUNTERS_KEY)
        run_id = flow_run_id(context)
        # Dagster will not retry this attempt: a handler error then fails the page's jobs.
        final_attempt = context.retry_number >= flow.retry_policy.max_retries
        with heartbeat(store, run_id, heartbeat_interval(flow.deadline)):
            pages = chunk.pages or [flow.source.fetch(ref) for ref in chunk.refs]
            process_pages(flow, run_id, pages, counters, store, final_attempt=final_attempt)
        return len(chunk)

    @dg.op(
        name=f"{flow.name}_collect",
        required_resource_keys={STORE_KEY},
        description="Check that every planned page has its row in the ledger.",
        tags=tags,
    )
    def collect(context: dg.OpExecutionContext, pages_per_chunk: list[int]) -> None:
        store: MetricsStore = getattr(context.resources, STORE_KEY)
        run_id = flow_run_id(context)
        missing = store.missing_pages(run_id)
        if missing:
            # A re-execution from failure re-runs failed steps only: steps that never
            # started (orchestrator died, run terminated) are out of its reach.
            raise dg.Failure(
                f"flow {flow.name}: {missing_pages_text(missing)} of the plan never ran in"
                " this run; re-execute all steps (not from failure) to read them"
            )
        store.mark_extraction_done(run_id)
        context.log.info(f"flow {flow.name}: extraction done, {sum(pages_per_chunk)} pages")

    @dg.graph(name=f"{flow.name}_graph", description=flow.description)
    def flow_graph() -> None:
        collect(plan().map(process).collect())

    return flow_graph.to_job(
        name=flow.job_name,
        partitions_def=flow.partitions,
        tags=tags,
        description=flow.description,
    )


def flow_run_id(context: dg.OpExecutionContext) -> str:
    """The flow run an op works for: the root of a re-execution group, else this run.

    A re-execution (from failure, or of chosen steps) continues the same flow run: its
    pages replace the earlier attempt's in the ledger, and a flow run already finalized as
    failed or cancelled is reopened so the finalizer classifies the new outcome.
    """
    run = context.run
    if run.parent_run_id is None:
        return run.run_id
    root = run.root_run_id or run.parent_run_id
    if run.tags.get(ROOT_RUN_ID_TAG) != root:
        # The UI tags re-executions with their group; the Python API (execute_job with
        # ReexecutionOptions) does not. The finalizer finds a group's newest run by this tag.
        context.instance.add_run_tags(
            run.run_id, {ROOT_RUN_ID_TAG: root, PARENT_RUN_ID_TAG: run.parent_run_id}
        )
    getattr(context.resources, STORE_KEY).reopen(root)
    return root


def _code_location(run: dg.DagsterRun) -> str | None:
    """The code location that launched the run (None for in-process executions)."""
    origin = run.remote_job_origin
    return origin.location_name if origin is not None else None


def _reported_total(chunk: PageChunk) -> int | None:
    totals = [p.reported_total for p in (*chunk.refs, *chunk.pages) if p.reported_total]
    return max(totals) if totals else None


def _chunks(flow: Flow, partition_key: str | None) -> Iterator[PageChunk]:
    refs = flow.source.plan(partition_key)
    if refs is not None:
        for group in batched(refs, flow.pages_per_step):
            yield PageChunk(refs=tuple(group))
    else:
        for group in batched(flow.source.pages(partition_key), flow.pages_per_step):
            yield PageChunk(pages=tuple(group))


def batched(items: Iterable[T], size: int) -> Iterator[tuple[T, ...]]:
    """``itertools.batched`` (Python 3.12+), for 3.10 and 3.11."""
    iterator = iter(items)
    while group := tuple(islice(iterator, size)):
        yield group


def build_flow_asset(flow: Flow) -> dg.AssetSpec:
    """The flow's asset: where the finalizer reports each run's metrics and status."""
    return dg.AssetSpec(
        key=flow.asset_key,
        description=f"Run metrics of flow {flow.name} (reported by finalize_flow_runs).",
        group_name=flow.group,
        partitions_def=flow.partitions,
        kinds={"redis", "sql"},
        metadata={"flow/job": flow.job_name, "flow/source": str(flow.source)},
    )


def build_flow_schedule(flow: Flow, job: dg.JobDefinition) -> dg.ScheduleDefinition | None:
    """The flow's schedule: its cron; a time-partitioned flow runs its newest partition.

    Each partition's run has ``run_key`` = the partition key, so a tick repeated for the
    same partition launches nothing new.
    """
    if flow.schedule is None:
        return None
    partitions = flow.partitions
    if not isinstance(partitions, dg.TimeWindowPartitionsDefinition):
        return dg.ScheduleDefinition(
            name=f"{flow.name}_schedule", job=job, cron_schedule=flow.schedule
        )

    @dg.schedule(name=f"{flow.name}_schedule", job=job, cron_schedule=flow.schedule)
    def latest_partition(
        context: dg.ScheduleEvaluationContext,
    ) -> dg.RunRequest | dg.SkipReason:
        keys = partitions.get_partition_keys(current_time=context.scheduled_execution_time)
        if not keys:
            return dg.SkipReason(f"no complete partition of {flow.name} yet")
        return dg.RunRequest(run_key=keys[-1], partition_key=keys[-1])

    return latest_partition
