"""The Dagster objects of one flow: a fanned-out job, its schedule, its asset and check.

Shape of the job ``<flow>_job``::

    <flow>_plan  --(one DynamicOutput per chunk of pages)-->  <flow>_pages (mapped)
                 --collect-->  <flow>_collect (marks extraction done)

A chunk holds ``pages_per_step`` page refs (random-access sources: each step fetches its
pages) or pages already read (sequential sources: the plan op reads them in order), so
Dagster's per-step cost is paid once per chunk, not once per page. Chunks go through
``flow_assets.chunk_io``, which the finalizer empties once a run is final and successful.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import dagster as dg

from flow_assets.chunk_io import CHUNKS_IO_MANAGER_KEY
from flow_assets.dagster_names import (
    FLOW_TAG,
    PARENT_RUN_ID_TAG,
    PARTITION_TAG,
    ROOT_RUN_ID_TAG,
    STATUS_TAG,
    schedule_name,
)
from flow_assets.flow import Flow
from flow_assets.heartbeat import heartbeat, heartbeat_interval
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page, PageRef, SourceDownError
from flow_assets.step_errors import outward_errors
from resources.batching import batched
from resources.errors import StoreUnavailableError
from resources.flow_run import FlowRun
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.ledger.page_ranges import missing_pages_text
from resources.ledger.schema import SUCCESSFUL_STATUSES
from resources.live.counters import LiveCounters
from resources.live.redis_counters import RedisCounters

# A partition's Dagster run in one of these is in progress: its schedule does not launch it.
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


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
    """The flow's job: plan pages, process chunks in mapped steps, collect.

    The ops take the ledger and the counters as typed resource parameters: Dagster hands
    each the resource whose key is the parameter's name (``STORE_KEY``, ``COUNTERS_KEY``).
    """
    tags = {FLOW_TAG: flow.name}
    plan, process, collect = _plan_op(flow, tags), _pages_op(flow, tags), _collect_op(flow, tags)

    @dg.graph(name=f"{flow.name}_graph", description=flow.description)
    def flow_graph() -> None:
        collect(plan().map(process).collect())

    return flow_graph.to_job(
        name=flow.job_name,
        partitions_def=flow.partitions,
        tags=tags,
        description=flow.description,
    )


def _plan_op(flow: Flow, tags: dict[str, str]) -> dg.OpDefinition:
    """The plan op: records the run and its policy, fans the pages out in chunks."""

    @dg.op(
        name=f"{flow.name}_plan",
        # Chunks of sequential sources hold records: kept where the finalizer removes them.
        out=dg.DynamicOut(PageChunk, io_manager_key=CHUNKS_IO_MANAGER_KEY),
        # A sequential source is read here in full: an outage longer than its HTTP retries
        # re-reads it from the first page rather than throwing the run away.
        retry_policy=flow.retry_policy,
        description=f"Plan the pages of {flow.source} and fan them out in chunks.",
        tags=tags,
    )
    def plan(
        context: dg.OpExecutionContext, metrics_store: MetricsStore, redis_counters: RedisCounters
    ) -> Iterator[dg.DynamicOutput[PageChunk]]:
        with outward_errors(flow, "plan"):
            store, counters = metrics_store.ledger(), redis_counters.counters()
            partition_key = context.partition_key if context.has_partition_key else None
            run_id = join_flow_run(context, flow, store, counters)
            policy = flow.run_policy(_code_location(context.run))
            store.start_run(run_id, flow.name, partition_key, datetime.now(timezone.utc), policy)
            counters.start_run(flow.name, run_id)
            pages_total, reported_totals = 0, []
            # A sequential source is read here in full, for as long as it takes: alive.
            with heartbeat(store, run_id, heartbeat_interval(flow.deadline)):
                for chunk in _chunks(flow, partition_key):
                    pages_total += len(chunk)
                    reported_totals += _reported_totals(chunk)
                    yield dg.DynamicOutput(chunk, mapping_key=chunk.mapping_key)
            # Dagster starts the mapped steps once this op has returned: the plan is in the
            # ledger before any page is, and extraction is done when each page has its row.
            store.record_plan(run_id, pages_total, max(reported_totals, default=None))

    return plan


def _pages_op(flow: Flow, tags: dict[str, str]) -> dg.OpDefinition:
    """The mapped page op: fetches (or takes) a chunk's pages and processes them."""

    @dg.op(
        name=f"{flow.name}_pages",
        retry_policy=flow.retry_policy,
        description="Validate, dedup and dispatch the records of a chunk of pages.",
        tags=tags,
    )
    def process(
        context: dg.OpExecutionContext,
        chunk: PageChunk,
        metrics_store: MetricsStore,
        redis_counters: RedisCounters,
    ) -> int:
        with outward_errors(flow, "pages"):
            store, counters = metrics_store.ledger(), redis_counters.counters()
            run_id = join_flow_run(context, flow, store, counters)
            attempt = context.run_id  # a re-execution is a new attempt: it tries the source again
            if chunk.refs and (down := _known_source_down(store, run_id, attempt)):
                raise _source_down(flow, down)  # found by another step of this attempt
            # Dagster will not retry this attempt: a handler error then fails the page's jobs.
            final_attempt = context.retry_number >= flow.retry_policy.max_retries
            with heartbeat(store, run_id, heartbeat_interval(flow.deadline)):
                try:
                    pages = chunk.pages or [flow.source.fetch(ref) for ref in chunk.refs]
                except SourceDownError as exc:
                    # Every step would wait out its retries on it again: record it, fail fast.
                    store.note_source_down(run_id, attempt, str(exc))
                    raise _source_down(
                        flow, store.source_down(run_id, attempt) or str(exc)
                    ) from None  # the message says it all; what it wraps may quote a URL
                process_pages(flow, run_id, pages, counters, store, final_attempt=final_attempt)
        return len(chunk)

    return process


def _collect_op(flow: Flow, tags: dict[str, str]) -> dg.OpDefinition:
    """The collect op: extraction is done once every planned page has its row."""

    @dg.op(
        name=f"{flow.name}_collect",
        description="Check that every planned page has its row in the ledger.",
        tags=tags,
    )
    def collect(
        context: dg.OpExecutionContext,
        pages_per_chunk: list[int],
        metrics_store: MetricsStore,
        redis_counters: RedisCounters,
    ) -> None:
        with outward_errors(flow, "collect"):
            store = metrics_store.ledger()
            run_id = join_flow_run(context, flow, store, redis_counters.counters())
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

    return collect


def join_flow_run(
    context: dg.OpExecutionContext, flow: Flow, store: Ledger, counters: LiveCounters
) -> str:
    """Join the op's Dagster run to its flow run; return the flow run's id: the root of a
    re-execution group, else this Dagster run's id.

    A first run writes nothing. A re-execution (from failure, or of chosen steps) continues
    the same flow run: its pages replace the earlier attempt's in the ledger, and a flow
    run already finalized as failed or cancelled is reopened so the finalizer classifies
    the new outcome. For a re-execution it writes:

    - the Dagster run's group tags (``ROOT_RUN_ID_TAG``, ``PARENT_RUN_ID_TAG``) when it
      lacks them (a re-execution launched from Python);
    - the ledger row, reopened (``running`` again) if it was final;
    - when reopened, ``STATUS_TAG=running`` on every Dagster run of the group;
    - the run's Redis state, restored from the ledger once per reopening by the first step
      that needs it (its finalization removed it; not a loss: no counter-mismatch note). A
      step cannot tell a later loss from that removal, so the ledger decides every key of a
      reopened run (``page_queries.replace_pages``): a key still reaches the handler once.

    A flow run that ended ``completed`` or ``partial_success`` is not reopened: its
    re-execution fails at its first step, changing nothing.
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
    reopened = store.reopen(root)
    revision = _revision_to_continue(flow, store, root)
    if reopened:
        group = context.instance.get_run_ids(dg.RunsFilter(tags={ROOT_RUN_ID_TAG: root}))
        for run_id in {root, *group}:
            context.instance.add_run_tags(run_id, {STATUS_TAG: "running"})
    if revision:
        # Whichever step of the re-execution comes first restores it (once): not a loss.
        FlowRun(flow.name, root, store, counters).restore_reopened(revision)
    return root


def _revision_to_continue(flow: Flow, store: Ledger, root: str) -> int:
    """The revision of the flow run a re-execution continues (0: never final, or no row
    yet). A flow run that ended successfully is never reopened (its final row stands): its
    re-execution fails at its first step, before it writes anything."""
    rows = store.runs(run_id=root)
    if not rows:
        return 0  # the first attempt failed before its plan step wrote the row
    if rows[0].flow_status in SUCCESSFUL_STATUSES:
        raise dg.Failure(
            f"flow {flow.name}: run {root} already ended {rows[0].flow_status}; a"
            " re-execution cannot change a finished successful run. Launch a new run of the"
            " job to read the source again.",
            allow_retries=False,
        )
    return rows[0].revision


def _code_location(run: dg.DagsterRun) -> str | None:
    """The code location that launched the run (None for in-process executions)."""
    origin = run.remote_job_origin
    return origin.location_name if origin is not None else None


def _reported_totals(chunk: PageChunk) -> list[int]:
    """The record counts the source reported on the chunk's pages (or their refs)."""
    totals = [ref.reported_total for ref in chunk.refs if ref.reported_total is not None]
    return totals + [page.reported_total for page in chunk.pages if page.reported_total is not None]


def _chunks(flow: Flow, partition_key: str | None) -> Iterator[PageChunk]:
    refs = flow.source.plan(partition_key)
    if refs is not None:
        for group in batched(refs, flow.pages_per_step):
            yield PageChunk(refs=group)
    else:
        for pages in batched(flow.source.pages(partition_key), flow.pages_per_step):
            yield PageChunk(pages=pages)


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

    A tick launches the newest complete partition only when that partition has no run in
    progress (a Dagster run of the job queued, starting or started, or a ``running`` row in
    the ledger) and no successful run (``completed`` or ``partial_success``; unless
    ``flow.rerun_partitions``); otherwise it skips, saying which run is in the way. (Dagster
    deduplicates ``run_key`` within one tick time only, so a frequent cron alone would launch
    the same partition on every tick.) An unpartitioned flow runs on every tick.
    """
    if flow.schedule is None:
        return None
    partitions = flow.partitions
    if not isinstance(partitions, dg.TimeWindowPartitionsDefinition):
        return dg.ScheduleDefinition(
            name=schedule_name(flow.name), job=job, cron_schedule=flow.schedule
        )

    @dg.schedule(name=schedule_name(flow.name), job=job, cron_schedule=flow.schedule)
    def latest_partition(
        context: dg.ScheduleEvaluationContext, metrics_store: MetricsStore
    ) -> dg.RunRequest | dg.SkipReason:
        keys = partitions.get_partition_keys(current_time=context.scheduled_execution_time)
        if not keys:
            return dg.SkipReason(f"no complete partition of {flow.name} yet")
        key = keys[-1]
        partition = f"flow {flow.name}: partition {key}"
        active = context.instance.get_runs(
            dg.RunsFilter(job_name=job.name, tags={PARTITION_TAG: key}, statuses=ACTIVE_STATUSES),
            limit=1,
        )
        if active:
            status = active[0].status.value.lower()
            return dg.SkipReason(
                f"{partition} has a run in progress: Dagster run {active[0].run_id} ({status})"
            )
        ledger = metrics_store.ledger().partition_runs(
            flow.name, key, ("running", *SUCCESSFUL_STATUSES), limit=10
        )
        running = [(run_id, status) for run_id, status in ledger if status == "running"]
        if running:
            run_id, status = running[0]
            return dg.SkipReason(f"{partition} has a run in progress: {run_id} ({status})")
        if ledger and not flow.rerun_partitions:
            run_id, status = ledger[0]
            return dg.SkipReason(
                f"{partition} already has a successful run: {run_id} ({status}); set"
                " rerun_partitions=True on the flow to launch it again on every tick"
            )
        return dg.RunRequest(run_key=key, partition_key=key)

    return latest_partition


def _known_source_down(store: Ledger, run_id: str, attempt: str) -> str | None:
    """The source-down note of this attempt; None also when the ledger cannot be read now:
    failing fast is a shortcut, and the step's own writes say whether the ledger is down."""
    try:
        return store.source_down(run_id, attempt)
    except StoreUnavailableError:
        return None


def _source_down(flow: Flow, error: str) -> dg.Failure:
    """The step failure (not retried) of a run whose source was found down."""
    return dg.Failure(
        f"flow {flow.name}: the source is down; the run's page steps fail without retrying."
        f" {error} Re-execute the run from failure once the source is back.",
        allow_retries=False,
    )
