"""How ``flowctl`` shows things: tables a person reads, progress, and one-line errors."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flow_assets.errors import FlowDefinitionError
from resources.errors import ConfigurationError, FlowError
from resources.redaction import redact_text

# flowctl's exit codes (documented in flow_assets/cli/app.py and the README).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Piped output (CI logs, `| less`) gets room for the whole table instead of 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=180)
err_console = Console(stderr=True)

_RUN_COLUMNS = (
    ("flow", "flow_name"),
    ("run", "run_id"),
    ("partition", "partition_key"),
    ("status", "flow_status"),
    ("source", "source_record_count"),
    ("dispatched", "dispatched_jobs"),
    ("skipped", "skipped_records"),
    ("rejected", "rejected_records"),
    ("completed", "completed_jobs"),
    ("failed", "failed_jobs"),
    ("pages", "pages_done"),
    ("runtime ms", "total_runtime_ms"),
)
# C0 and C1 control characters: a record key or an error holding ESC must not drive the
# terminal (clear it, recolour it, fake a line).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_STATUS_STYLE = {
    "completed": "green",
    "partial_success": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    "running": "cyan",
}


@contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner while long work runs (plain text when not on a terminal)."""
    with console.status(message):
        yield
    console.print(f"[dim]done:[/dim] {message}")


def print_runs(rows: Sequence[Any]) -> None:
    table = Table(title="flow_metrics")
    for title, _ in _RUN_COLUMNS:
        numeric = title not in ("flow", "run", "partition", "status")
        table.add_column(title, justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        values = [_cell(getattr(row, attr)) for _, attr in _RUN_COLUMNS]
        values[3].stylize(_STATUS_STYLE.get(row.flow_status, ""))
        table.add_row(*values)
    console.print(table)
    for row in rows:
        if row.failure_reason or row.counter_mismatch:
            notes = "; ".join(filter(None, [row.failure_reason, row.counter_mismatch]))
            console.print(_cell(f"  {row.run_id} {row.flow_status}: {notes}"), highlight=False)


def print_rejects(rejects: Sequence[Any], failures: Sequence[Any]) -> None:
    if rejects:
        table = Table(title="rejected records (quarantine)")
        for column in ("page", "position", "reason", "record"):
            table.add_column(column, overflow="fold")
        for r in rejects:
            table.add_row(
                _cell(r.page_index), _cell(r.position), _cell(r.reason), _cell(r.raw_record[:200])
            )
        console.print(table)
    if failures:
        table = Table(title="failed jobs")
        for column in ("record key", "page", "error"):
            table.add_column(column, overflow="fold")
        for f in failures:
            table.add_row(_cell(f.record_key), _cell(f.page_index), _cell(f.error[:300]))
        console.print(table)
    if not rejects and not failures:
        console.print("no rejected records and no failed jobs")


def print_late(outcomes: Sequence[dict[str, Any]]) -> None:
    """RQ job outcomes that arrived after the run was final: recorded, not counted."""
    if not outcomes:
        return
    table = Table(title=f"{len(outcomes)} outcomes arrived after the run was final (not counted)")
    for column in ("record key", "page", "outcome", "error", "at"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        error = (o["error"] or "")[:300]
        cells = (o["record_key"], o["page_index"], o["outcome"], error, o["late_at"])
        table.add_row(*map(_cell, cells))
    console.print(table)


def print_strays(strays: Sequence[Any], *, dry_run: bool) -> None:
    if not strays:
        console.print("no stray Redis keys")
        return
    for stray in strays:
        if not stray.removable:
            action = "kept (no such run in this ledger)"
        else:
            action = "would remove" if dry_run else "removed"
        console.print(
            f"{stray.flow_name} {stray.run_id} [{stray.flow_status}]: {action}",
            highlight=False,
            markup=False,  # "[completed]" is text here, not a rich style tag
        )


def as_plain(item: Any) -> dict[str, Any]:
    """A dataclass (or a dict) as a JSON-friendly dict."""
    values = item if isinstance(item, dict) else dataclasses.asdict(item)
    return {k: _jsonable(v) for k, v in values.items()}


def fail(exc: BaseException) -> int:
    """Print one redacted error line; return the exit code: 2 for a usage or configuration
    error, else 1."""
    if isinstance(exc, (click.exceptions.Exit, typer.Exit)):
        return exc.exit_code
    # Typer vendors its own click: its usage errors are TyperExceptions, not click's.
    if isinstance(exc, (click.ClickException, typer.TyperException)):
        _print_error(redact_text(exc.format_message()) or type(exc).__name__)
        return exc.exit_code
    exc = _our_error(exc)
    message = redact_text(str(exc)) or type(exc).__name__
    _print_error(message)
    return EXIT_USAGE if _is_configuration_error(exc) else EXIT_FAILED


def _print_error(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else message
    line = Text("error: ", style="red") + _cell(first_line)
    err_console.print(line, highlight=False, soft_wrap=True)


def _is_configuration_error(exc: BaseException) -> bool:
    """A setting or a flow definition is wrong: what the user gave, not what happened."""
    return isinstance(exc, (ConfigurationError, FlowDefinitionError))


def _our_error(exc: BaseException) -> BaseException:
    """The first FlowError in the cause chain (Dagster wraps resource and step errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FlowError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _cell(value: Any) -> Text:
    """Data as plain text: rich markup in it (``[/]``) is not parsed, control characters
    are shown escaped (``\\x1b``), so no record or error can break or drive the terminal."""
    text = "" if value is None else str(value)
    return Text(_CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text))


def _jsonable(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
