"""Turn a list of flows into one ``dagster.Definitions``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from flow_assets.checks import build_status_check
from flow_assets.chunk_io import CHUNKS_IO_MANAGER_KEY, PageChunkIOManager, retention_days
from flow_assets.dagster_flow import build_flow_asset, build_flow_job, build_flow_schedule
from flow_assets.dagster_names import COUNTERS_KEY, STORE_KEY
from flow_assets.errors import ConfigurationError
from flow_assets.flow import Flow, unique_flows
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.live.counters import LiveCounters
from resources.live.redis_counters import RedisCounters
from sensors.finalizer import FlowPolicy
from sensors.sensor import build_finalizer_sensor

INTERVAL_ENV = "FLOW_FINALIZER_INTERVAL_SECONDS"


def build_definitions(
    flows: Sequence[Flow],
    *,
    resources: Mapping[str, Any] | None = None,
    finalizer_interval_seconds: int | None = None,
) -> dg.Definitions:
    """Jobs, schedules, assets and checks of every flow, plus the finalizer sensor.

    Args:
        flows: the flows; names must be unique.
        resources: overrides of the ``metrics_store`` / ``redis_counters`` resources
            (default: configured from FLOW_DATABASE_URL, FLOW_REDIS_URL and FLOW_HOME).
        finalizer_interval_seconds: seconds between finalizer ticks (default: env
            FLOW_FINALIZER_INTERVAL_SECONDS, else 15).

    Examples:
        >>> defs = build_definitions([orders_flow])  # doctest: +SKIP
    """
    by_name = unique_flows(list(flows))
    jobs = {name: build_flow_job(flow) for name, flow in by_name.items()}
    schedules = [
        schedule
        for name, flow in by_name.items()
        if (schedule := build_flow_schedule(flow, jobs[name])) is not None
    ]
    policies = {
        name: FlowPolicy(tolerance=flow.tolerance, deadline=flow.deadline)
        for name, flow in by_name.items()
    }
    sensor = build_finalizer_sensor(
        policies, minimum_interval_seconds=finalizer_interval_seconds or _interval_from_env()
    )
    return dg.Definitions(
        jobs=list(jobs.values()),
        schedules=schedules,
        sensors=[sensor],
        assets=[build_flow_asset(flow) for flow in by_name.values()],
        asset_checks=[build_status_check(flow) for flow in by_name.values()],
        resources={**default_resources(), **(resources or {})},
    )


def default_resources() -> dict[str, Any]:
    """The resources configured from the environment; unset means the embedded default.
    Also the IO manager of the plan steps' page chunks (see ``flow_assets.chunk_io``).

    URLs are passed as ``EnvVar``s, so the Dagster UI shows the variable, not the secret.
    """
    # Fail at load, naming the variable, rather than in the first run's first step.
    Ledger().resolved_url()
    LiveCounters().redacted_url()
    retention_days()
    return {
        STORE_KEY: MetricsStore(url=_env_var("FLOW_DATABASE_URL")),
        COUNTERS_KEY: RedisCounters(url=_env_var("FLOW_REDIS_URL")),
        CHUNKS_IO_MANAGER_KEY: PageChunkIOManager(),
    }


def _env_var(name: str) -> Any:
    return dg.EnvVar(name) if os.environ.get(name) else None


def _interval_from_env() -> int:
    raw = os.environ.get(INTERVAL_ENV, "15")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(
            f"{INTERVAL_ENV}={raw!r} is invalid: set it to a whole number of seconds >= 1"
        )
    return int(raw)
