"""The ``finalize_flow_runs`` sensor: a thin shell around ``finalize_runs``.

A plain batched ``@sensor`` rather than a run-status sensor: run-status sensors handle at
most 5 runs a tick, and a run may also finish later than its Dagster run (pending jobs).
"""

import json
from collections.abc import Mapping

import dagster as dg

from flow_assets.dagster_names import SENSOR_NAME, STATUS_CHECK, STATUS_TAG
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.live.counters import LiveCounters
from resources.live.redis_counters import RedisCounters
from sensors.chunk_cleanup import remove_successful_chunks, sweep_old_chunks
from sensors.cleanup import remove_stray_keys
from sensors.finalizer import DEFAULT_BATCH_SIZE, FinalizeReport, FlowPolicy, finalize_runs
from sensors.pooling import pooled_storage_connections

# Scanning Redis for stray keys costs O(keys on the server): every 20th tick is enough
# for keys that also expire by their TTL.
CLEANUP_EVERY_TICKS = 20
# After this long a tick starts publishing no new chunk of runs: ticks stay well inside
# Dagster's 60 s sensor timeout and the 15 s interval; a backlog is published over several.
DEFAULT_TICK_BUDGET_SECONDS = 6.0


def build_finalizer_sensor(
    policies: Mapping[str, FlowPolicy],
    *,
    minimum_interval_seconds: int = 15,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tick_budget_seconds: float = DEFAULT_TICK_BUDGET_SECONDS,
) -> dg.SensorDefinition:
    """The finalizer sensor for the given flows, running by default.

    Args:
        policies: failure tolerance and deadline per flow name.
        minimum_interval_seconds: seconds between ticks.
        batch_size: unfinished runs examined per tick (the rest wait for the next tick).
        tick_budget_seconds: seconds into a tick after which it publishes no new chunk of
            final runs to Dagster (the rest goes out on the next tick).

    Examples:
        >>> sensor = build_finalizer_sensor({"orders": FlowPolicy()})
        >>> sensor.name
        'finalize_flow_runs'
    """

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Finalizes flow runs: computes their totals from the ledger, classifies them"
            " (completed, partial_success, failed, cancelled), tags the run with"
            f" {STATUS_TAG}, reports asset metadata and the {STATUS_CHECK} check, and removes"
            " the run's Redis keys."
        ),
    )
    def finalize_flow_runs(
        context: dg.SensorEvaluationContext,
        metrics_store: MetricsStore,
        redis_counters: RedisCounters,
    ) -> dg.SensorResult:
        ledger, counters = metrics_store.ledger(), redis_counters.counters()
        with pooled_storage_connections(context.instance):
            report = finalize_runs(
                context.instance,
                ledger,
                counters,
                policies,
                batch_size=batch_size,
                time_budget_seconds=tick_budget_seconds,
            )
            remove_successful_chunks(context.instance, report.published)
        return _tick_result(context, report, ledger, counters)

    return finalize_flow_runs


def _tick_result(
    context: dg.SensorEvaluationContext,
    report: FinalizeReport,
    ledger: Ledger,
    counters: LiveCounters,
) -> dg.SensorResult:
    """Count the tick in the cursor, clean up every ``CLEANUP_EVERY_TICKS``th tick, and
    skip the tick (no run requested either way) when it finalized and published nothing."""
    state = json.loads(context.cursor or "{}")
    ticks = state.get("ticks", 0) + 1
    if ticks % CLEANUP_EVERY_TICKS == 0:
        removed = [stray for stray in remove_stray_keys(ledger, counters) if stray.removable]
        report.stray_keys_removed = len(removed)
        sweep_old_chunks(context.instance)
    context.log.info(report.summary())
    finalized_total = state.get("finalized_total", 0) + len(report.finalized)
    cursor = json.dumps({"ticks": ticks, "finalized_total": finalized_total})
    if not report.finalized and not report.published:
        return dg.SensorResult(skip_reason=dg.SkipReason(report.summary()), cursor=cursor)
    return dg.SensorResult(cursor=cursor)
