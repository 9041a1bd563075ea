"""The bundled demo flows, over files shipped with the package.

``demo_orders`` reads 5,000 order records of which 300 are re-sent duplicates: it ends
``partial_success`` (4,700 dispatched and completed, 300 skipped). ``demo_customers``
reads 2,000 unique customers: it ends ``completed``.
"""

from __future__ import annotations

from pathlib import Path

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource

DEMO_DATA = Path(__file__).parent / "demo_data"
ORDERS_FILE = DEMO_DATA / "orders.jsonl"
CUSTOMERS_FILE = DEMO_DATA / "customers.csv"


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
