"""Page indexes as short text for humans: ``pages 16-19, 23``."""

from __future__ import annotations

from collections.abc import Iterable


def missing_pages_text(indexes: Iterable[int], limit: int = 10) -> str:
    """``pages 16-19, 23`` (runs of consecutive indexes; at most ``limit`` runs shown)."""
    runs: list[list[int]] = []
    for index in sorted(set(indexes)):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    if len(runs) > limit:
        parts.append(f"... ({len(runs) - limit} more ranges)")
    count = sum(b - a + 1 for a, b in runs)
    return f"{'page' if count == 1 else 'pages'} {', '.join(parts)}"
