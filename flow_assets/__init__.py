"""dagster-flow-metrics: exact, durable run metrics and an honest final status for flows.

Public names are imported lazily (PEP 562) so that ``flowctl --help`` does not pay for
importing Dagster.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Flow": "flow_assets.flow",
    "JobBatch": "flow_assets.dispatch",
    "RqDispatch": "flow_assets.rq.dispatch",
    "build_definitions": "flow_assets.build",
    "default_resources": "flow_assets.build",
    "ConfigurationError": "flow_assets.errors",
    "FlowDefinitionError": "flow_assets.errors",
    "HandlerError": "flow_assets.errors",
    "SourceError": "flow_assets.errors",
    "FileSource": "flow_assets.sources",
    "HttpJsonSource": "flow_assets.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flow_assets' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
