"""``MetricsStore``: the Dagster resource that configures the SQL ledger.

It holds settings only; :meth:`MetricsStore.ledger` returns the Dagster-free
:class:`~resources.ledger.ledger.Ledger` that does the work (the shape of dagster-duckdb's
resource and its ``get_connection()``).
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from resources.ledger.ledger import DEFAULT_CONNECT_RETRY_SECONDS, Ledger


class MetricsStore(ConfigurableResource):
    """Settings of the durable ledger of flow runs (PostgreSQL, or SQLite as the default).

    Args:
        url: SQLAlchemy URL of the database.
        auto_migrate: upgrade the schema to the newest revision on first use.
        connect_retry_seconds: how long to keep retrying a failed connection.

    Examples:
        .. code-block:: python

            from dagster import Definitions, EnvVar, op

            @op
            def latest(metrics_store: MetricsStore) -> str:
                return metrics_store.ledger().runs(limit=1)[0].flow_status

            defs = Definitions(
                jobs=[...],
                resources={"metrics_store": MetricsStore(url=EnvVar("FLOW_DATABASE_URL"))},
            )
    """

    url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the metrics database (postgresql+psycopg://... or"
            " sqlite:///...). Defaults to $FLOW_DATABASE_URL, else the SQLite file"
            " $FLOW_HOME/flow_metrics.db (FLOW_HOME defaults to ./.flow_home)."
        ),
    )
    auto_migrate: bool = Field(
        default=True,
        description=(
            "Upgrade the schema to the newest revision on first use in a process. When"
            " false, an outdated schema is an error asking you to run `flowctl db upgrade`."
        ),
    )
    connect_retry_seconds: float = Field(
        default=DEFAULT_CONNECT_RETRY_SECONDS,
        ge=0,
        description="How long to retry a failed connection (exponential backoff with jitter).",
    )

    def ledger(self) -> Ledger:
        """The ledger these settings describe (cheap: engines are cached per process)."""
        return Ledger(
            url=self.url,
            auto_migrate=self.auto_migrate,
            connect_retry_seconds=self.connect_retry_seconds,
        )
