"""Settings for ``rq worker -c flow_assets.rq_settings <queue>...`` (RQ reads UPPERCASE names).

- ``REDIS_URL``: ``FLOW_REDIS_URL``, else the embedded Redis server under ``FLOW_HOME``
  (the server the flows' counters and queues use), started here if it is not running yet,
  so a worker may start before the first flow run. ``--url`` on the command line wins.
- Imports ``flow_assets.rq_worker`` and the modules listed in ``FLOW_RQ_PRELOAD``
  (comma-separated, e.g. the module defining your handlers) once, in the worker process,
  so that the work horse RQ forks for each job starts with them loaded.
"""

from __future__ import annotations

import importlib
import os

from flow_assets import rq_worker  # noqa: F401  (preloaded for the forked work horses)
from resources import migrations
from resources.embedded_redis import configured_redis_url, ensure_embedded_redis
from resources.home import flow_home

# Validated: a malformed URL fails here naming FLOW_REDIS_URL, quoting no password.
REDIS_URL = configured_redis_url() or ensure_embedded_redis(flow_home())

for _module in filter(None, (m.strip() for m in os.environ.get("FLOW_RQ_PRELOAD", "").split(","))):
    importlib.import_module(_module)

# Load the migration scripts once here: each forked work horse inherits them instead of
# parsing them again for its schema check.
migrations.head_revision()
