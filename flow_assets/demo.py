"""The bundled demo flows, over files shipped with the package.

``demo_orders`` reads 5,000 order records of which 300 are re-sent duplicates: it ends
``partial_success`` (4,700 dispatched and completed, 300 skipped). ``demo_customers``
reads 2,000 unique customers: it ends ``completed``.

``flowctl demo`` (:func:`run_demo`) runs them on a persistent Dagster instance at
``$FLOW_HOME/dagster`` (:func:`demo_dagster_home`), so the Dagster UI opened on that instance
(``DAGSTER_HOME=$PWD/.flow_home/dagster dagster dev -w workspace.yaml``) shows their runs
with their ``flow/status`` tags, the ``flows/<name>`` materializations and the
``flow_status`` checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from flow_assets.dagster_names import REPOSITORY_LABEL_TAG
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from resources.home import flow_home

if TYPE_CHECKING:
    from flow_assets.cli.runner import Progress
    from resources.ledger.records import RunRow

DEMO_DATA = Path(__file__).parent / "demo_data"
ORDERS_FILE = DEMO_DATA / "orders.jsonl"
CUSTOMERS_FILE = DEMO_DATA / "customers.csv"
DEMO_FLOW_NAMES = ("demo_orders", "demo_customers")
# The code location's name in workspace.yaml (and pyproject.toml's [tool.dagster]): the
# demo's runs are tagged as runs of its jobs.
DEMO_CODE_LOCATION = "flow_metrics"
# The demo's Dagster instance directory, under FLOW_HOME.
DEMO_DAGSTER_DIR = "dagster"
# Dagster's defaults suit the demo (SQLite storages in this directory); the file only says
# so, and keeps Dagster from warning that the instance has no configuration file.
DEMO_DAGSTER_YAML = """\
# The Dagster instance of `flowctl demo` (FLOW_HOME/dagster), created by it. Empty on
# purpose: Dagster's defaults keep runs, events and schedules in SQLite files here. Open it
# with: DAGSTER_HOME=<this directory> dagster dev -w workspace.yaml
"""


def check_order(batch: JobBatch) -> None:
    """A stand-in for a real handler: an order without a positive amount fails its job."""
    for record in batch:
        if int(record["amount_cents"]) > 0:
            batch.complete(record)
        else:
            batch.fail(record, ValueError("amount_cents must be positive"))


def accept_customer(batch: JobBatch) -> None:
    """A stand-in for an upsert: every customer is accepted (unreported jobs complete)."""


def demo_flows() -> list[Flow]:
    return [
        Flow(
            name="demo_orders",
            source=FileSource(ORDERS_FILE, page_size=250),
            key="order_id",
            handler=check_order,
            group="demo",
            description="Demo: 5,000 orders, 300 of them re-sent duplicates (partial_success).",
        ),
        Flow(
            name="demo_customers",
            source=FileSource(CUSTOMERS_FILE, page_size=200),
            key="customer_id",
            handler=accept_customer,
            group="demo",
            description="Demo: 2,000 unique customers (completed).",
        ),
    ]


def demo_dagster_home() -> Path:
    """``$FLOW_HOME/dagster``, the persistent Dagster instance of ``flowctl demo``; the
    directory and its ``dagster.yaml`` are created if missing (an existing file is kept)."""
    home = flow_home() / DEMO_DAGSTER_DIR
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DEMO_DAGSTER_YAML)
    return home


def run_demo(progress: Progress) -> list[RunRow]:
    """Run the demo flows on the embedded default and return their ``flow_metrics`` rows.

    The runs are kept in the persistent Dagster instance at ``$FLOW_HOME/dagster`` and
    finalized there, so the Dagster UI opened on it with ``workspace.yaml`` shows them with
    their tags, materializations and checks. They run with ``execute_job`` as runs of the
    code location's jobs, tagged with its repository label as runs the UI launches are, so
    each job's page lists them too.
    """
    from flow_assets.cli import runner
    from flow_assets.definitions import defs

    home = demo_dagster_home()
    label = f"{defs.get_repository_def().name}@{DEMO_CODE_LOCATION}"
    with runner.embedded_redis_session(), dg.DagsterInstance.from_config(str(home)) as instance:
        return [
            runner.run_flow(
                defs,
                name,
                instance=instance,
                module=runner.DEFAULT_MODULE,
                tags={REPOSITORY_LABEL_TAG: label},
                progress=progress,
            )
            for name in DEMO_FLOW_NAMES
        ]
