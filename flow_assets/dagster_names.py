"""The names the package gives Dagster objects, and the Dagster tags it reads: defined here once.

A flow named ``orders`` becomes the job ``orders_job``, the schedule ``orders_schedule`` and
the asset ``flows/orders`` with the check ``flow_status``; one sensor, ``finalize_flow_runs``,
finalizes every flow. Each Dagster run of a flow carries ``flow/name`` and, once the flow run
is final, ``flow/status``. The Dagster tags below are Dagster's own (its re-execution group
and partition); ``tests/unit/test_dagster_private.py`` checks them against Dagster's.

Imports nothing of the package: ``flow_assets`` and ``sensors`` both use it.
"""

from __future__ import annotations

import dagster as dg

# Resource keys. Dagster hands a resource to an op, schedule, sensor or check through the
# parameter of the same name (``metrics_store: MetricsStore``): these are also those
# parameters' names, and the keys of user Definitions' ``resources``.
STORE_KEY = "metrics_store"
COUNTERS_KEY = "redis_counters"

# The package's tags.
FLOW_TAG = "flow/name"  # on a flow's job, ops and every Dagster run of it
STATUS_TAG = "flow/status"  # on each Dagster run of a flow run: its status (running, then final)
# On runs flowctl launches: the module `flowctl run -m` loaded the flow from, which
# `flowctl rerun` reloads.
MODULE_TAG = "flowctl/module"

# Dagster's own tags (set by Dagster; the ops also set the group tags on Python re-executions).
DAGSTER_TAG_PREFIX = "dagster/"
ROOT_RUN_ID_TAG = "dagster/root_run_id"  # every run of a re-execution group: its first run
PARENT_RUN_ID_TAG = "dagster/parent_run_id"  # a re-execution: the run it re-executes
PARTITION_TAG = "dagster/partition"
# Hidden: a run's code location, "<repository>@<location>"; the UI lists a job's runs by it.
REPOSITORY_LABEL_TAG = ".dagster/repository"

SENSOR_NAME = "finalize_flow_runs"
STATUS_CHECK = "flow_status"
ASSET_PREFIX = "flows"
JOB_SUFFIX = "_job"
SCHEDULE_SUFFIX = "_schedule"


def job_name(flow_name: str) -> str:
    """The Dagster job of a flow: ``<flow>_job``."""
    return f"{flow_name}{JOB_SUFFIX}"


def schedule_name(flow_name: str) -> str:
    """The Dagster schedule of a flow that has one: ``<flow>_schedule``."""
    return f"{flow_name}{SCHEDULE_SUFFIX}"


def flow_asset_key(flow_name: str) -> dg.AssetKey:
    """The asset of a flow, where the finalizer reports its runs: ``flows/<flow>``."""
    return dg.AssetKey([ASSET_PREFIX, flow_name])
