"""Errors a user can cause by what they ask ingest to read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shared.errors import RecsysError


class IngestError(RecsysError):
    """The source cannot be ingested; the message names the input and what was wrong."""


@dataclass(frozen=True)
class RowError:
    file: str
    line: int
    reason: str
    raw: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ErrorReport:
    """Keeps the first `keep` errors in full and counts every reason."""

    keep: int = 20
    first: list[RowError] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def add(self, error: RowError, kind: str) -> None:
        self.total += 1
        self.counts[kind] += 1
        if len(self.first) < self.keep:
            self.first.append(error)

    def render(self) -> str:
        lines = [str(e) for e in self.first]
        if self.total > len(self.first):
            lines.append(f"... and {self.total - len(self.first)} more")
        lines.append("counts: " + ", ".join(f"{k}: {n}" for k, n in self.counts.most_common()))
        return "\n".join(lines)


class RejectedInput(IngestError):
    """Rows failed validation; nothing was written."""

    def __init__(self, source: str, report: ErrorReport) -> None:
        self.report = report
        super().__init__(
            f"{source}: rejected, {report.total} invalid row(s); the database is unchanged\n"
            + report.render()
        )
