"""flowctl's rendering of data it does not control (record keys, raw records, errors): shown
as plain text, never parsed as rich markup or passed to the terminal as control codes."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from flow_assets.cli import render as cli_render
from resources.counts import Counts
from resources.errors import FlowError

pytestmark = pytest.mark.unit
HOSTILE = "[/] [bold]x[/bold] \x1b[2J\x1b[31mred \x9b2J"


def run_row(reason: str) -> SimpleNamespace:
    counts = Counts(source=1, rejected=1)
    return SimpleNamespace(
        flow_name="orders",
        run_id="r1",
        partition_key=HOSTILE,
        flow_status="failed",
        source_record_count=counts.source,
        dispatched_jobs=0,
        skipped_records=0,
        rejected_records=1,
        completed_jobs=0,
        failed_jobs=0,
        pages_done=1,
        total_runtime_ms=5,
        failure_reason=reason,
        counter_mismatch=None,
    )


def captured(call: object) -> str:
    with cli_render.console.capture() as capture:
        call()  # type: ignore[operator]
    return capture.get()


def test_rejects_and_failures_with_markup_and_escape_codes_print_as_text() -> None:
    reject = SimpleNamespace(page_index=0, position=1, reason=HOSTILE, raw_record=HOSTILE)
    failure = SimpleNamespace(record_key=HOSTILE, page_index=0, error=HOSTILE)
    out = captured(lambda: cli_render.print_rejects([reject], [failure]))
    assert "[/]" in out and "[bold]x[/bold]" in out
    assert "\x1b[2J" not in out and "\x9b" not in out
    assert "\\x1b[2J" in out and "\\x9b2J" in out


def test_a_run_whose_reason_quotes_markup_prints() -> None:
    out = captured(lambda: cli_render.print_runs([run_row(f"handler raised {HOSTILE}")]))
    assert "handler raised [/]" in out and "\x1b" not in out


def test_late_outcomes_print_as_text() -> None:
    late = {
        "record_key": HOSTILE,
        "page_index": 0,
        "outcome": "failed",
        "error": HOSTILE,
        "late_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
    }
    out = captured(lambda: cli_render.print_late([late]))
    assert "[/]" in out and "\x1b" not in out


def test_an_error_quoting_markup_is_printed_whole(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_render.fail(FlowError(f"bad key {HOSTILE}")) == cli_render.EXIT_FAILED
    err = capsys.readouterr().err
    assert "bad key [/]" in err and "\x1b[2J" not in err
