"""``RedisCounters``: the Dagster resource that configures the live counters in Redis.

It holds settings only; :meth:`RedisCounters.counters` returns the Dagster-free
:class:`~resources.live.counters.LiveCounters` that does the work.
"""

from __future__ import annotations

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field

from resources.live.counters import DEFAULT_KEY_TTL_SECONDS, LiveCounters


class RedisCounters(ConfigurableResource):
    """Settings of the live counters of flow runs in Redis.

    Args:
        url: Redis URL; None reads FLOW_REDIS_URL, else runs the embedded server.
        key_ttl_seconds: TTL of every run key, refreshed on each write.

    Examples:
        .. code-block:: python

            from dagster import Definitions, op
            from resources.live.redis_counters import RedisCounters

            @op
            def page_step(context, redis_counters: RedisCounters):
                counters = redis_counters.counters()
                owned = counters.claim_page("orders_api", context.run_id, 0, ["a", "b"])

            defs = Definitions(
                jobs=[...],
                # url unset: FLOW_REDIS_URL, else the embedded server under FLOW_HOME.
                resources={"redis_counters": RedisCounters(key_ttl_seconds=6 * 3600)},
            )
    """

    url: str | None = Field(
        default=None,
        description=(
            "Redis URL (redis://, rediss:// or unix://). Unset: the FLOW_REDIS_URL environment"
            " variable, else an embedded Redis server with its socket under FLOW_HOME."
        ),
    )
    key_ttl_seconds: int = Field(
        default=DEFAULT_KEY_TTL_SECONDS,
        gt=0,
        description="Seconds every run-scoped key lives after its last write (default 24 h).",
    )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Fail when the step starts, naming the setting, rather than at its first page.
        self.counters().redacted_url()

    def counters(self) -> LiveCounters:
        """The live counters these settings describe (cheap: clients are cached per process)."""
        return LiveCounters(url=self.url, key_ttl_seconds=self.key_ttl_seconds)
