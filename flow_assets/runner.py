"""Run flows outside the Dagster daemon: the engine behind ``flowctl run`` and ``flowctl demo``.

Runs go through Dagster for real (``execute_in_process``) and are finalized by evaluating
the very ``finalize_flow_runs`` sensor the daemon runs, so every path finalizes the same way.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import dagster as dg

from flow_assets.errors import ConfigurationError, FlowError
from flow_assets.jobs import COUNTERS_KEY, STORE_KEY
from resources.metrics_store import MetricsStore, RunRow
from sensors.sensor import SENSOR_NAME

# Dagster's events (step failures with their tracebacks included) belong in the UI and the
# event log; on a terminal the finalized row and its one-line reason say what happened.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

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
) -> RunRow:
    """Execute a flow's job in-process, finalize it, and return its ``flow_metrics`` row.

    A run whose jobs went to RQ workers (``dispatch="rq"``) is still ``running`` when its
    Dagster run ends: it is finalized again every second, for up to ``wait_seconds``, until
    the workers have acknowledged every job.
    """
    job = _job(defs, flow_name)
    label = f"flow {flow_name}" + (f" [{partition_key}]" if partition_key else "")
    with _instance(instance) as dagster_instance:
        with progress(f"running {label}"):
            result = job.execute_in_process(
                instance=dagster_instance,
                partition_key=partition_key,
                raise_on_error=False,
                run_config=QUIET_RUN_CONFIG,
            )
        with progress(f"finalizing {label}"):
            finalize_now(defs, dagster_instance)
        with resolved_store(defs) as store:
            row = _row(store, flow_name, result.run_id)
            if row.flow_status == "running" and wait_seconds > 0:
                with progress(f"waiting up to {wait_seconds:g} s for the jobs of {label}"):
                    row = _wait_for_jobs(defs, dagster_instance, store, row, wait_seconds)
    return row


def _row(store: MetricsStore, flow_name: str, run_id: str) -> RunRow:
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
    store: MetricsStore,
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


def run_demo(progress: Progress = _no_progress) -> list[RunRow]:
    """Run both demo flows on the embedded default and return their rows."""
    from flow_assets.definitions import defs

    with embedded_redis_session(), dg.DagsterInstance.ephemeral() as instance:
        return [
            run_flow(defs, name, instance=instance, progress=progress)
            for name in ("demo_orders", "demo_customers")
        ]


def finalize_now(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Evaluate one tick of the ``finalize_flow_runs`` sensor against ``instance``."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        sensor(context)


@contextmanager
def resolved_store(defs: dg.Definitions) -> Iterator[MetricsStore]:
    """The definitions' metrics store with its configuration (EnvVars) resolved."""
    with dg.build_resources({STORE_KEY: (defs.resources or {})[STORE_KEY]}) as resources:
        yield getattr(resources, STORE_KEY)


@contextmanager
def embedded_redis_session() -> Iterator[None]:
    """Stop the embedded Redis afterwards if this session started it (FLOW_REDIS_URL unset)."""
    if os.environ.get("FLOW_REDIS_URL"):
        yield
        return
    from resources.embedded_redis import embedded_redis_running, stop_embedded_redis
    from resources.home import flow_home

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
        job.name.removesuffix("_job")
        for job in defs.resolve_all_job_defs()
        if job.tags.get("flow/name")
    )
    if flow_name not in names:
        raise ConfigurationError(f"no flow named {flow_name!r}; known flows: {', '.join(names)}")
    return defs.resolve_job_def(f"{flow_name}_job")


__all__ = ["COUNTERS_KEY", "finalize_now", "load_definitions", "run_demo", "run_flow"]
