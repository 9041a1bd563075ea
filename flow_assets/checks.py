"""The ``flow_status`` asset check: the status of the flow's latest finished run.

The finalizer reports this check for every run it finalizes; the definition lets the UI
show it and lets a user re-evaluate it on demand.
"""

import dagster as dg

from flow_assets.dagster_names import STATUS_CHECK
from flow_assets.flow import Flow
from resources.ledger.metrics_store import MetricsStore
from sensors.publish import final_check


def build_status_check(flow: Flow) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=flow.asset_key,
        name=STATUS_CHECK,
        description="WARN on partial_success or cancelled, ERROR on failed, of the latest run.",
    )
    def flow_status(metrics_store: MetricsStore) -> dg.AssetCheckResult:
        finished = [
            r
            for r in metrics_store.ledger().runs(flow_name=flow.name, limit=50)
            if r.flow_status != "running"
        ]
        if not finished:
            return dg.AssetCheckResult(passed=True, description="no finished run yet")
        evaluation = final_check(finished[0])
        return dg.AssetCheckResult(
            passed=evaluation.passed,
            severity=evaluation.severity,
            description=evaluation.description,
            metadata=dict(evaluation.metadata),
        )

    return flow_status
