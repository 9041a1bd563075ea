"""Run flows outside the Dagster daemon: the engine behind ``flowctl run``, ``flowctl rerun``
and ``flowctl demo``.

Runs go through Dagster for real and are finalized by evaluating the very
``finalize_flow_runs`` sensor the daemon runs, so every path finalizes the same way. On a
temporary instance a run executes in-process with its step outputs in memory; on the
persistent instance of ``DAGSTER_HOME`` it executes with ``execute_job`` (in-process
executor, outputs stored under ``DAGSTER_HOME``), so a failed run can be re-executed from
failure later (:func:`rerun_flow`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import dagster as dg

from flow_assets.dagster_names import (
    COUNTERS_KEY,
    DAGSTER_TAG_PREFIX,
    FLOW_TAG,
    MODULE_TAG,
    PARENT_RUN_ID_TAG,
    ROOT_RUN_ID_TAG,
    SENSOR_NAME,
    STATUS_TAG,
    STORE_KEY,
    job_name,
)
from flow_assets.errors import ConfigurationError, FlowError
from resources.ledger.ledger import Ledger
from resources.ledger.records import RunRow

# Dagster's events (step failures with their tracebacks included) belong in the UI and the
# event log; on a terminal the finalized row and its one-line reason say what happened.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
# Runs on the persistent instance: the in-process executor (as with execute_in_process), its
# step outputs written by the default filesystem IO manager under DAGSTER_HOME.
PERSISTENT_RUN_CONFIG = {**QUIET_RUN_CONFIG, "execution": {"config": {"in_process": {}}}}
DEFAULT_MODULE = "flow_assets.definitions"
_RERUNNABLE = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
_FINISHED = (*_RERUNNABLE, dg.DagsterRunStatus.SUCCESS)

Progress = Callable[[str], AbstractContextManager[Any]]
WAIT_POLL_SECONDS = 1.0


def _no_progress(message: str) -> AbstractContextManager[None]:
    return nullcontext()


def load_definitions(module_name: str) -> dg.Definitions:
    """The ``defs`` of a code location module (the working directory is importable, as with
    ``dagster dev -m``)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r} ({exc}); pass --module with an importable"
            " module that defines `defs = build_definitions([...])`"
        ) from exc
    defs = getattr(module, "defs", None)
    if not isinstance(defs, dg.Definitions):
        raise ConfigurationError(
            f"module {module_name!r} has no `defs` Definitions; add"
            " `defs = build_definitions([...])` to it"
        )
    return defs


def run_flow(
    defs: dg.Definitions,
    flow_name: str,
    *,
    partition_key: str | None = None,
    instance: dg.DagsterInstance | None = None,
    progress: Progress = _no_progress,
    wait_seconds: float = 0.0,
    module: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunRow:
    """Execute a flow's job, finalize it, and return its ``flow_metrics`` row.

    With ``module`` (the module whose ``defs`` these are) and a persistent instance (the
    default when ``DAGSTER_HOME`` is set), the run executes with ``execute_job`` and keeps
    its step outputs in the instance's storage, so :func:`rerun_flow` can re-execute it
    from failure. Otherwise it executes in-process with its outputs in memory.

    A run whose jobs went to RQ workers (``dispatch="rq"``) is still ``running`` when its
    Dagster run ends: it is finalized again every second, for up to ``wait_seconds``, until
    the workers have acknowledged every job. ``tags`` are added to the run's tags.
    """
    job = _job(defs, flow_name)
    label = f"flow {flow_name}" + (f" [{partition_key}]" if partition_key else "")
    run_tags = {**(tags or {}), **({MODULE_TAG: module} if module else {})}
    with _instance(instance) as dagster_instance:
        _check_partition(job, flow_name, partition_key, dagster_instance)
        with progress(f"running {label}"):
            if module is not None and not dagster_instance.is_ephemeral:
                if partition_key is not None:
                    run_tags.update(job.get_tags_for_partition_key(partition_key, None))
                # Not opened as a context manager: that would rebuild the resources to
                # read outputs, which nothing here needs.
                run_id = dg.execute_job(
                    _reconstructable(module, flow_name),
                    instance=dagster_instance,
                    run_config=PERSISTENT_RUN_CONFIG,
                    tags=run_tags,
                ).run_id
            else:
                run_id = job.execute_in_process(
                    instance=dagster_instance,
                    partition_key=partition_key,
                    raise_on_error=False,
                    run_config=QUIET_RUN_CONFIG,
                    tags=run_tags,
                ).run_id
        return _finalized_row(
            defs, dagster_instance, flow_name, run_id, label, progress, wait_seconds
        )


def rerun_flow(
    run_id: str,
    *,
    module: str | None = None,
    all_steps: bool = False,
    progress: Progress = _no_progress,
    wait_seconds: float = 0.0,
) -> RunRow:
    """Re-execute a failed flow run on the ``DAGSTER_HOME`` instance, finalize it, and
    return its ``flow_metrics`` row.

    The re-execution continues the same flow run: its row is the root run's (the run
    ``flowctl run`` printed), whichever run of the re-execution group ``run_id`` names.
    From failure (the default) only the failed steps and the steps after them run again,
    reading the earlier steps' outputs from the instance's storage; ``all_steps`` runs
    every step again, and also recovers a run that failed on its failed jobs alone
    (its Dagster run succeeded). The newest run of the group is the parent, so a
    recovery that failed again can be re-executed with the same id.

    Raises:
        ConfigurationError: ``DAGSTER_HOME`` is unset, or the run cannot be re-executed
            (unknown, not a flow run, in progress, or its flow run already succeeded).
    """
    instance = _persistent_instance()
    flow_name, root, parent = _reexecution_parent(instance, run_id)
    module = module or parent.tags.get(MODULE_TAG) or DEFAULT_MODULE
    defs = load_definitions(module)
    _job(defs, flow_name)
    with resolved_ledger(defs) as store:
        rows = store.runs(run_id=root)
    if rows and rows[0].flow_status in ("completed", "partial_success"):
        raise ConfigurationError(
            f"flow {flow_name!r} run {root} already ended {rows[0].flow_status}: there is"
            f" nothing to recover; `flowctl run {flow_name}` starts a new run"
        )
    _check_reexecutable(flow_name, root, parent, all_steps=all_steps)
    label = f"flow {flow_name} run {root}"
    options = (
        dg.ReexecutionOptions(parent_run_id=parent.run_id)
        if all_steps
        else dg.ReexecutionOptions.from_failure(parent.run_id, instance)
    )
    what = "all steps" if all_steps else "from failure"
    with progress(f"re-executing {label} ({what})"):
        dg.execute_job(
            _reconstructable(module, flow_name),
            instance=instance,
            run_config=PERSISTENT_RUN_CONFIG,
            tags=_reexecution_tags(parent, root, module),
            reexecution_options=options,
        )
    return _finalized_row(defs, instance, flow_name, root, label, progress, wait_seconds)


def _persistent_instance() -> dg.DagsterInstance:
    """The instance of ``DAGSTER_HOME``, where failed runs keep their step outputs."""
    if not os.environ.get("DAGSTER_HOME"):
        raise ConfigurationError(
            "flowctl rerun needs DAGSTER_HOME: set it to the Dagster instance directory the"
            " failed run was recorded in (a temporary instance keeps no step outputs to"
            " re-execute from, so run flows with DAGSTER_HOME set to be able to recover them)"
        )
    return dg.DagsterInstance.get()


def _reexecution_parent(
    instance: dg.DagsterInstance, run_id: str
) -> tuple[str, str, dg.DagsterRun]:
    """``(flow name, root run id, parent)`` of a re-execution of ``run_id``'s group: the
    newest run of the group is the parent, so a recovery that failed again goes on."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        raise ConfigurationError(
            f"no Dagster run {run_id!r} in DAGSTER_HOME={os.environ['DAGSTER_HOME']}; pass"
            " the run id `flowctl run` printed (or `flowctl status` lists)"
        )
    flow_name = run.tags.get(FLOW_TAG)
    if not flow_name:
        raise ConfigurationError(f"run {run_id} (job {run.job_name}) is not a flow run")
    root = run.root_run_id or run.run_id
    newest = instance.get_runs(dg.RunsFilter(tags={ROOT_RUN_ID_TAG: root}), limit=1)
    return flow_name, root, newest[0] if newest else (instance.get_run_by_id(root) or run)


def _check_reexecutable(
    flow_name: str, root: str, parent: dg.DagsterRun, *, all_steps: bool
) -> None:
    """Refuse a parent Dagster cannot re-execute this way, saying what to do instead."""
    if parent.status in (_FINISHED if all_steps else _RERUNNABLE):
        return
    which = "its Dagster run" if parent.run_id == root else f"its re-execution {parent.run_id}"
    hint = (
        "wait for it to end"
        if parent.status not in _FINISHED
        else "from failure needs a failed run; --all-steps re-executes every step (a run"
        " that failed on its failed jobs alone)"
    )
    raise ConfigurationError(
        f"cannot re-execute flow {flow_name!r} run {root}: {which} is"
        f" {parent.status.value.lower()}; {hint}"
    )


def _reexecution_tags(parent: dg.DagsterRun, root: str, module: str) -> dict[str, str]:
    """Dagster copies no tags to a re-execution: keep the partition and our own, and tag it
    with its group (as the UI does) so the finalizer finds the group's newest run."""
    tags = {
        key: value
        for key, value in parent.tags.items()
        if key != STATUS_TAG and (not key.startswith(DAGSTER_TAG_PREFIX) or "partition" in key)
    }
    tags.update({ROOT_RUN_ID_TAG: root, PARENT_RUN_ID_TAG: parent.run_id, MODULE_TAG: module})
    return tags


def flow_job(module_name: str, flow_name: str) -> dg.JobDefinition:
    """The job of ``flow_name`` in ``module_name``'s ``defs``: the reconstructable entry
    point of runs on the persistent instance (``dg.build_reconstructable_job``)."""
    return _job(load_definitions(module_name), flow_name)


def _reconstructable(module: str, flow_name: str) -> Any:
    return dg.build_reconstructable_job(
        __name__,
        flow_job.__name__,
        reconstructable_kwargs={"module_name": module, "flow_name": flow_name},
        reconstructor_working_directory=os.getcwd(),
    )


def _check_partition(
    job: dg.JobDefinition,
    flow_name: str,
    partition_key: str | None,
    instance: dg.DagsterInstance,
) -> None:
    if partition_key is None:
        return
    partitions = job.partitions_def
    if partitions is None:
        raise ConfigurationError(f"flow {flow_name!r} has no partitions: drop --partition")
    known = partitions.get_partition_keys(dynamic_partitions_store=instance)
    if partition_key not in known:
        shown = ", ".join(list(known)[:5]) + (", ..." if len(known) > 5 else "")
        raise ConfigurationError(
            f"flow {flow_name!r} has no partition {partition_key!r}; pass one of: {shown}"
        )


def _finalized_row(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    flow_name: str,
    run_id: str,
    label: str,
    progress: Progress,
    wait_seconds: float,
) -> RunRow:
    with progress(f"finalizing {label}"):
        finalize_now(defs, instance)
    with resolved_ledger(defs) as store:
        row = _row(store, flow_name, run_id)
        if row.flow_status == "running" and wait_seconds > 0:
            with progress(f"waiting up to {wait_seconds:g} s for the jobs of {label}"):
                row = _wait_for_jobs(defs, instance, store, row, wait_seconds)
    return row


def _row(store: Ledger, flow_name: str, run_id: str) -> RunRow:
    rows = store.runs(run_id=run_id)
    if not rows:
        raise FlowError(
            f"flow {flow_name!r} run {run_id} wrote no flow_metrics row: it failed before"
            " planning; run with DAGSTER_HOME set and inspect the run in the Dagster UI"
        )
    return rows[0]


def _wait_for_jobs(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    store: Ledger,
    row: RunRow,
    wait_seconds: float,
) -> RunRow:
    """Finalize every second until the run is final (its workers acked every job)."""
    give_up = time.monotonic() + wait_seconds
    dagster_log = logging.getLogger("dagster")
    level = dagster_log.level
    dagster_log.setLevel(logging.WARNING)  # no "waiting: 1" line every second
    try:
        while row.flow_status == "running" and time.monotonic() < give_up:
            time.sleep(WAIT_POLL_SECONDS)
            finalize_now(defs, instance)
            row = _row(store, row.flow_name, row.run_id)
    finally:
        dagster_log.setLevel(level)
    return row


def finalize_now(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Evaluate one tick of the ``finalize_flow_runs`` sensor against ``instance``."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        sensor(context)


@contextmanager
def resolved_ledger(defs: dg.Definitions) -> Iterator[Ledger]:
    """The ledger of the definitions' metrics store, its configuration (EnvVars) resolved."""
    with dg.build_resources({STORE_KEY: (defs.resources or {})[STORE_KEY]}) as resources:
        yield getattr(resources, STORE_KEY).ledger()


@contextmanager
def embedded_redis_session() -> Iterator[None]:
    """Stop the embedded Redis afterwards if this session started it (FLOW_REDIS_URL unset)."""
    if os.environ.get("FLOW_REDIS_URL"):
        yield
        return
    from resources.home import flow_home
    from resources.live.embedded_redis import embedded_redis_running, stop_embedded_redis

    home = flow_home()
    was_running = embedded_redis_running(home)
    try:
        yield
    finally:
        if not was_running:
            stop_embedded_redis(home)


@contextmanager
def _instance(instance: dg.DagsterInstance | None) -> Iterator[dg.DagsterInstance]:
    if instance is not None:
        yield instance
    elif os.environ.get("DAGSTER_HOME"):
        yield dg.DagsterInstance.get()
    else:
        with dg.DagsterInstance.ephemeral() as temporary:
            yield temporary


def _job(defs: dg.Definitions, flow_name: str) -> dg.JobDefinition:
    names = sorted(
        job.tags[FLOW_TAG] for job in defs.resolve_all_job_defs() if job.tags.get(FLOW_TAG)
    )
    if flow_name not in names:
        raise ConfigurationError(f"no flow named {flow_name!r}; known flows: {', '.join(names)}")
    return defs.resolve_job_def(job_name(flow_name))


__all__ = [
    "COUNTERS_KEY",
    "finalize_now",
    "flow_job",
    "load_definitions",
    "rerun_flow",
    "run_flow",
]
