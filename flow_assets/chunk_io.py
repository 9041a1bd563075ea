"""Where the page chunks a flow's plan step hands to its page steps are kept, and when they go.

A chunk of a random-access source (HTTP page numbers or offsets, JSON Lines files) holds page
refs only: where to fetch each page, no record. A chunk of a sequential source (cursors, next
links, SQL keyset, CSV, Parquet) holds the pages the plan step read, records included: the
page steps of another process, or of a later re-execution, need them, so they are written
to disk under ``<Dagster storage>/flow_chunks/<Dagster run id>/``.

They stay there only while they may be needed:

* once a flow run is final ``completed`` or ``partial_success``, the finalizer removes the
  chunks of every Dagster run of its re-execution group;
* a ``failed`` or ``cancelled`` run keeps them, so it can be re-executed from failure, until
  its re-execution group has been idle (no Dagster run in progress or updated) for
  ``FLOW_CHUNK_RETENTION_DAYS`` days (default 7); the finalizer's periodic sweep then
  removes them.

This module stores and removes chunks; when to remove them is the finalizer's, in
``sensors/chunk_cleanup.py``.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
from upath import UPath

from flow_assets.errors import ConfigurationError, SourceError

CHUNKS_IO_MANAGER_KEY = "flow_chunks_io_manager"
CHUNKS_DIR = "flow_chunks"
RETENTION_ENV = "FLOW_CHUNK_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 7.0


def chunks_root(instance: dg.DagsterInstance) -> Path:
    """The directory holding every run's page chunks on this Dagster instance."""
    return Path(instance.storage_directory()) / CHUNKS_DIR


class ChunkFiles(dg.UPathIOManager):
    """One pickle file per chunk: ``<root>/<run id>/<step key>/result/<mapping key>``.

    Pickle, as Dagster's own filesystem IO manager: records keep their Python types (dates,
    decimals) from the plan step to the page step; the files are the instance's own.
    """

    extension = ".pickle"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except RecursionError:
            # A record nested hundreds of levels deep: parseable JSON, yet not a record a
            # handler can be given; fail with a reason rather than a raw RecursionError.
            raise SourceError(
                f"a record of the pages for step {context.step_key} nests too deeply to hand"
                " to the page steps (more levels than Python's recursion limit). Fix: check"
                " the source, or have it leave out such records."
            ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            upstream = context.upstream_output
            raise dg.Failure(
                f"the page chunk {path.name} of Dagster run {upstream.run_id if upstream else '?'}"
                " is gone: chunks are removed once their flow run is final and successful, or"
                f" {RETENTION_ENV} days after a failure. Re-execute all steps (not from"
                " failure) to read the pages again.",
                allow_retries=False,
            ) from None
        return pickle.loads(data)


class PageChunkIOManager(dg.ConfigurableIOManagerFactory):  # type: ignore[type-arg]
    """Keeps the plan step's page chunks under the instance's storage, for the finalizer
    to remove (see the module docstring)."""

    def create_io_manager(self, context: dg.InitResourceContext) -> ChunkFiles:
        instance = context.instance
        if instance is None:  # only outside a run, e.g. building resources by hand
            raise ConfigurationError(f"{CHUNKS_IO_MANAGER_KEY} needs a Dagster instance")
        return ChunkFiles(base_path=UPath(chunks_root(instance)))


def remove_run_chunks(instance: dg.DagsterInstance, dagster_run_ids: Iterable[str]) -> int:
    """Remove the chunks of these Dagster runs; return how many runs had some."""
    root = chunks_root(instance)
    removed = 0
    for run_id in dagster_run_ids:
        directory = root / run_id
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
    return removed


def retention_days() -> float:
    """``FLOW_CHUNK_RETENTION_DAYS``, or the default; a clear error if it is not a number."""
    raw = os.environ.get(RETENTION_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_RETENTION_DAYS
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not days >= 0:
        raise ConfigurationError(
            f"{RETENTION_ENV}={raw!r} is invalid: set it to a number of days >= 0"
        )
    return days
