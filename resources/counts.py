"""Run and page counts: the one value type every layer (Redis, SQL, classify) speaks."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Counts:
    """Counts of one page or one run.

    Conservation: ``source = dispatched + skipped + rejected`` and
    ``dispatched = completed + failed + pending``.

    Args:
        source: records the source returned.
        dispatched: records turned into jobs (after validation and dedup).
        skipped: duplicates that were not dispatched.
        rejected: records that failed validation (kept in quarantine).
        completed: jobs that finished successfully.
        failed: jobs that finished with an error.

    Examples:
        >>> Counts(source=3, dispatched=2, skipped=1, completed=2).pending
        0
    """

    source: int = 0
    dispatched: int = 0
    skipped: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def pending(self) -> int:
        return self.dispatched - self.completed - self.failed

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.source,
            self.dispatched,
            self.skipped,
            self.rejected,
            self.completed,
            self.failed,
        )

    def conservation_errors(self) -> list[str]:
        """What breaks conservation, in words; empty when the counts are consistent."""
        errors = [
            f"{f.name}={getattr(self, f.name)} is negative"
            for f in fields(self)
            if getattr(self, f.name) < 0
        ]
        if self.source != self.dispatched + self.skipped + self.rejected:
            errors.append(
                f"source={self.source} != dispatched={self.dispatched} + skipped={self.skipped}"
                f" + rejected={self.rejected}"
            )
        if self.pending < 0:
            errors.append(
                f"completed={self.completed} + failed={self.failed} exceeds"
                f" dispatched={self.dispatched}"
            )
        return errors


COUNT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Counts))
