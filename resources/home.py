"""FLOW_HOME: where the embedded defaults (SQLite ledger, Redis socket) keep their files."""

from __future__ import annotations

import os
from pathlib import Path

ENV_FLOW_HOME = "FLOW_HOME"
DEFAULT_FLOW_HOME = ".flow_home"


def flow_home() -> Path:
    """``$FLOW_HOME`` (default ``./.flow_home``) as an absolute path; not created here."""
    return Path(os.environ.get(ENV_FLOW_HOME) or DEFAULT_FLOW_HOME).expanduser().resolve()
