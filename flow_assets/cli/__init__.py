"""``flowctl``: the commands (``app``), how they print (``render``), and running and
re-running flows through Dagster (``runner``)."""

from flow_assets.cli.app import main

__all__ = ["main"]
