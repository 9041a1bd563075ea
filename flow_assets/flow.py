"""Declaring a flow: a source, a record key, a handler, and how much failure is tolerable."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from datetime import timedelta
from typing import Any

import dagster as dg
from croniter import croniter

from flow_assets import dagster_names
from flow_assets.dispatch import ERROR_DETAILS, JobBatch
from flow_assets.errors import FlowDefinitionError
from flow_assets.options import is_int_at_least
from flow_assets.rq.dispatch import RqDispatch, handler_path, resolve_dispatch
from flow_assets.sources.base import Source
from resources.names import InvalidNameError, validate_name
from resources.redaction import redact_text
from resources.run_policy import RunPolicy
from sensors.classify import Tolerance

KeySpec = str | Callable[[Mapping[str, Any]], Hashable]
Handler = Callable[[JobBatch], None]

_OPTIONS = (
    "name", "source", "key", "handler", "partitions", "schedule", "max_failed_jobs", "group",
    "pages_per_step", "retry_policy", "deadline", "max_record_bytes", "description", "dedup",
    "dispatch", "keep_failed_keys", "rerun_partitions", "error_detail",
)  # fmt: skip
DEDUP_SCOPES = ("run", "flow")


class Flow:
    """A paginated source whose records are deduplicated and dispatched as jobs to a handler.

    Args:
        name: safe name (lower-case letters, digits, ``_``); becomes the Dagster job
            ``<name>_job``, the asset ``flows/<name>``, Redis keys and SQL values.
        source: where records come from (``HttpJsonSource``, ``FileSource``, ...).
        key: the record field holding its identity, or a function of the record returning
            it (str or int). Records without a usable key are rejected and quarantined.
        handler: called with a ``JobBatch`` of one page's deduplicated records; reports each
            record's outcome with ``batch.complete(record)`` / ``batch.fail(record, error)``.
            Records left unreported when it returns count as completed; if it raises, the
            page step fails and Dagster's retry policy re-runs it (pages count once).
        partitions: a Dagster ``PartitionsDefinition`` (daily, static, dynamic); the source
            receives the partition key.
        schedule: a cron string. For time-window partitions the schedule runs the latest
            partition at that cadence.
        max_failed_jobs: failed jobs tolerated before the run is ``failed``: an int count or
            a float ratio of dispatched jobs (default 0: any failure fails the run).
        group: Dagster group name of the flow's job and asset (default ``flows``).
        pages_per_step: pages handled by one mapped step; larger amortises Dagster's
            per-step cost, smaller spreads work wider (default 8).
        retry_policy: Dagster ``RetryPolicy`` for page steps (default: 2 retries).
        deadline: a run with pending jobs and no progress for this long is ``failed``
            (reason ``stalled``).
        max_record_bytes: records larger than this (as JSON) are rejected; None (the
            default) skips the size check, which costs a JSON encoding per record.
        description: shown in the Dagster UI.
        dedup: ``"run"`` (default): a key seen earlier in the same run is skipped.
            ``"flow"``: also skip keys any earlier or concurrent run of the flow dispatched
            (a durable table), so an incremental re-run dispatches only new records. Either
            way a retried or re-executed page keeps its own keys.
        dispatch: ``"inline"`` (default): page steps call the handler. ``"rq"`` or an
            ``RqDispatch(...)``: page steps enqueue the jobs on an RQ queue named after the
            flow and ``rq worker`` processes run the handler (it must be a top-level
            function of an importable module); the run is finalized when the last job
            ends. See ``flow_assets.rq.worker`` for running workers.
        keep_failed_keys: with ``dedup="flow"``, keep the keys of failed jobs claimed when
            a run is final, so later runs skip them too (default False: they are released
            and the next run dispatches them again).
        rerun_partitions: let the schedule launch a partition again although it already
            has a successful run (``completed`` or ``partial_success``); default False.
        error_detail: what a handler's exception shows outside the failed jobs' rows (the
            step failure, logs, ``failure_reason``, asset metadata, the check).
            ``"masked"`` (default): its class and message with personal data masked
            (emails, phone and other long numbers, tokens). ``"full"``: the whole message.
            Either way secrets are redacted and the rows keep the whole message (see
            docs/errors-and-personal-data.md).

    Examples:
        >>> from flow_assets import Flow, FileSource
        >>> orders = Flow(
        ...     name="orders",
        ...     source=FileSource("data/orders.jsonl", page_size=500),
        ...     key="order_id",
        ...     handler=lambda batch: None,
        ...     max_failed_jobs=0.01,
        ... )
    """

    def __init__(
        self,
        *,
        name: str,
        source: Source,
        key: KeySpec,
        handler: Handler,
        partitions: dg.PartitionsDefinition | None = None,
        schedule: str | None = None,
        max_failed_jobs: int | float = 0,
        group: str | None = None,
        pages_per_step: int = 8,
        retry_policy: dg.RetryPolicy | None = None,
        deadline: timedelta = timedelta(hours=1),
        max_record_bytes: int | None = None,
        description: str | None = None,
        dedup: str = "run",
        dispatch: str | RqDispatch = "inline",
        keep_failed_keys: bool = False,
        rerun_partitions: bool = False,
        error_detail: str = "masked",
        **unknown: Any,
    ) -> None:
        if unknown:
            raise FlowDefinitionError(
                f"Flow got unknown option(s) {sorted(unknown)}; valid options are {list(_OPTIONS)}"
            )
        self.name = _checked_name(name, "Flow name")
        _check_options(
            source=source,
            key=key,
            handler=handler,
            partitions=partitions,
            pages_per_step=pages_per_step,
            deadline=deadline,
            max_record_bytes=max_record_bytes,
            dedup=dedup,
            keep_failed_keys=keep_failed_keys,
            rerun_partitions=rerun_partitions,
            error_detail=error_detail,
        )
        self.source, self.key, self.handler = source, key, handler
        self.partitions: dg.PartitionsDefinition | None = partitions
        self.schedule = _checked_schedule(schedule, partitions)
        try:
            self.tolerance = Tolerance(max_failed_jobs)
        except ValueError as exc:
            raise FlowDefinitionError(f"Flow {name!r}: {exc}") from exc
        self.group = _checked_name(group or "flows", "Flow group")
        self.pages_per_step = pages_per_step
        self.retry_policy = retry_policy or dg.RetryPolicy(max_retries=2, delay=0.5)
        self.deadline = deadline
        self.max_record_bytes = max_record_bytes
        # Shown in the UI: a source's str() may hold a URL of the user's own making.
        self.description = redact_text(description or f"Flow {name}: {source}")
        self.dedup = dedup
        self.rq: RqDispatch | None = resolve_dispatch(dispatch, handler)
        self.handler_path = handler_path(handler) if self.rq else None
        self.keep_failed_keys, self.rerun_partitions = keep_failed_keys, rerun_partitions
        self.error_detail = error_detail

    def run_policy(self, code_location: str | None = None) -> RunPolicy:
        """The policy each run of this flow records when it starts (and is decided by)."""
        return RunPolicy(
            max_failed_jobs=self.tolerance.max_failed_jobs,
            deadline_seconds=self.deadline.total_seconds(),
            dedup=self.dedup,
            keep_failed_keys=self.keep_failed_keys,
            dispatch="rq" if self.rq else "inline",
            queue=self.queue_name,
            code_location=code_location,
        )

    @property
    def job_name(self) -> str:
        return dagster_names.job_name(self.name)

    @property
    def queue_name(self) -> str | None:
        """The RQ queue of the flow's jobs (dispatch="rq"), else None."""
        return (self.rq.queue or self.name) if self.rq else None

    @property
    def asset_key(self) -> dg.AssetKey:
        return dagster_names.flow_asset_key(self.name)

    def __repr__(self) -> str:
        return f"Flow(name={self.name!r}, source={self.source})"


def _checked_name(value: object, what: str) -> str:
    try:
        return validate_name(value, what)
    except InvalidNameError as exc:
        raise FlowDefinitionError(str(exc)) from exc


# Option -> (is the value valid?, what it must be): the checks that need the value alone.
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "source": (
        lambda v: isinstance(v, Source),
        "an object with plan(), fetch() and pages(), e.g. FileSource(...)",
    ),
    "key": (
        lambda v: (isinstance(v, str) and bool(v)) or callable(v),
        "a non-empty column name or a function of the record",
    ),
    "handler": (callable, "a function taking a JobBatch"),
    "partitions": (
        lambda v: v is None or isinstance(v, dg.PartitionsDefinition),
        "a Dagster PartitionsDefinition such as DailyPartitionsDefinition",
    ),
    "pages_per_step": (lambda v: is_int_at_least(v, 1), "an int >= 1"),
    "deadline": (
        lambda v: isinstance(v, timedelta) and v.total_seconds() > 0,
        "a positive timedelta",
    ),
    "max_record_bytes": (lambda v: v is None or is_int_at_least(v, 1), "None or an int >= 1"),
    "dedup": (lambda v: v in DEDUP_SCOPES, " or ".join(map(repr, DEDUP_SCOPES))),
    "keep_failed_keys": (lambda v: isinstance(v, bool), "a bool"),
    "rerun_partitions": (lambda v: isinstance(v, bool), "a bool"),
    "error_detail": (lambda v: v in ERROR_DETAILS, " or ".join(map(repr, ERROR_DETAILS))),
}


def _check_options(**values: Any) -> None:
    """Raise ``FlowDefinitionError`` naming the first option whose value breaks its rule."""
    for option, value in values.items():
        valid, expected = _OPTION_RULES[option]
        if not valid(value):
            raise FlowDefinitionError(
                f"Flow option {option}={value!r} is invalid: expected {expected}"
            )


def _checked_schedule(schedule: str | None, partitions: object) -> str | None:
    if schedule is None:
        return None
    if not isinstance(schedule, str) or not croniter.is_valid(schedule):
        raise FlowDefinitionError(
            f"Flow option schedule={schedule!r} is not a cron string; use e.g. '0 * * * *'"
        )
    if partitions is not None and not isinstance(partitions, dg.TimeWindowPartitionsDefinition):
        raise FlowDefinitionError(
            "Flow option schedule needs unpartitioned or time-window partitioned flows; for static"
            " or dynamic partitions launch runs from a sensor or the UI instead"
        )
    return schedule


def unique_flows(flows: list[Flow]) -> dict[str, Flow]:
    """Flows by name; a name used twice is refused."""
    by_name: dict[str, Flow] = {}
    for flow in flows:
        if flow.name in by_name:
            raise FlowDefinitionError(
                f"two flows are named {flow.name!r}: flow names must be unique; rename one"
            )
        by_name[flow.name] = flow
    return by_name
