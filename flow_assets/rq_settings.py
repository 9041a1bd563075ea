"""``rq worker -c flow_assets.rq_settings``: the worker settings, kept at this path for the
command line the README gives (see ``flow_assets.rq.settings``)."""

from flow_assets.rq.settings import *  # noqa: F403
