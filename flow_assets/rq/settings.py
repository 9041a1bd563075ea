"""Settings for ``rq worker -c flow_assets.rq_settings <queue>...`` (RQ reads UPPERCASE names).

- Makes the worker refuse what is not a job of this package (``flow_assets.rq.guard``): it
  reads JSON only, imports only this package's job function and callbacks, and runs only
  the handlers of the flows it loads here.
- ``REDIS_URL``: ``FLOW_REDIS_URL``, else the embedded Redis server under ``FLOW_HOME``
  (the server the flows' counters and queues use), started here if it is not running yet,
  so a worker may start before the first flow run. ``--url`` on the command line wins.
- Imports ``flow_assets.rq.worker`` and the modules listed in ``FLOW_RQ_PRELOAD``
  (comma-separated: the modules defining your flows) once, in the worker process, so that
  the work horse RQ forks for each job starts with them loaded. The worker runs the jobs
  of the ``dispatch="rq"`` flows those modules define at their top level (or in a
  top-level list), and no others.
"""

from __future__ import annotations

import logging
import os

import flow_assets.rq.worker  # noqa: F401  (preloaded for the forked work horses)
from flow_assets.rq import guard as rq_guard
from resources.errors import ConfigurationError
from resources.home import flow_home
from resources.ledger import migrations
from resources.live.embedded_redis import configured_redis_url, ensure_embedded_redis


def _refuse_spawn_worker() -> None:
    """``-w rq.worker.SpawnWorker`` runs each job in a fresh interpreter that never loads
    these settings (no guard, no flows): refuse to start rather than run jobs unguarded."""
    import click
    from rq.utils import import_attribute
    from rq.worker.worker_classes import SpawnWorker

    context = click.get_current_context(silent=True)
    name = context.params.get("worker_class") if context else None
    worker_class = import_attribute(name) if isinstance(name, str) else None
    if isinstance(worker_class, type) and issubclass(worker_class, SpawnWorker):
        raise ConfigurationError(
            f"flow_assets.rq_settings cannot guard {name}: its work horses do not load these"
            " settings. Fix: use rq.worker.Worker (the default) or rq.worker.SimpleWorker"
        )


_refuse_spawn_worker()
rq_guard.install()  # before the worker reads any job

# Validated: a malformed URL fails here naming FLOW_REDIS_URL, quoting no password.
REDIS_URL = configured_redis_url() or ensure_embedded_redis(flow_home())

if not rq_guard.load(rq_guard.preload_modules(os.environ)):
    logging.getLogger(__name__).warning(
        "no dispatch='rq' flow loaded: this worker will refuse every flow job. Fix: set %s"
        " to the modules defining your flows",
        rq_guard.PRELOAD_ENV,
    )

# Load the migration scripts once here: each forked work horse inherits them instead of
# parsing them again for its schema check.
migrations.head_revision()
