"""The model test's summary line (tests/faults/test_model.py)."""

from __future__ import annotations

import pytest

from tests.faults.model_profiles import MODEL_SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(MODEL_SUMMARY, [])
    if lines:
        terminalreporter.section("model test, deep profile")
        for line in lines:
            terminalreporter.write_line(line)
