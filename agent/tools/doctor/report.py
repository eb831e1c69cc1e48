"""The doctor's report: one :class:`Row` per finding, printed as a table with the fixes below."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["ok", "warn", "FAIL", "skip"]

TARGET_WIDTH = 40  # the table's target column; longer ones are shortened in the middle


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    check: str
    target: str
    verdict: Verdict
    finding: str
    fix: str | None = None


def broken(check: str, exc: BaseException) -> Row:
    """The row of a check that itself failed: a bug in one check must not hide the others."""
    return Row(
        check,
        "-",
        "FAIL",
        f"the check itself failed: {exception_text(exc)}",
        "run the doctor as root; if it persists, report it with this line",
    )


def exception_text(exc: BaseException) -> str:
    """``Type: message``, or the type alone when the message is empty."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def human_size(n: float) -> str:
    """``512 B``, ``6.8 KiB``, ``1.2 GiB``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def render(rows: Iterable[Row], width: int) -> str:
    """A table, one row per line, each fix on its own indented line below."""
    rows = list(rows)
    head = ("CHECK", "TARGET", "VERDICT", "FINDING")
    cells = [(r.check, _shorten(r.target), r.verdict, r.finding.replace("\n", "; ")) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    lines = []
    for (check, target, verdict, finding), row in zip([head, *cells], [None, *rows], strict=True):
        lines.append(f"{check:<{widths[0]}}  {target:<{widths[1]}}  {verdict:<{widths[2]}}  {finding}".rstrip())
        if row is not None and row.fix:
            lines.append(
                textwrap.fill(
                    f"fix: {row.fix}", width=max(40, width), initial_indent="    ", subsequent_indent="         "
                )
            )
    return "\n".join(lines)


def _shorten(text: str, most: int = TARGET_WIDTH) -> str:
    """Long targets (by-id paths) lose their middle in the table; --json has them whole."""
    if len(text) <= most:
        return text
    keep = most - 3
    return f"{text[: keep // 2]}...{text[-(keep - keep // 2) :]}"


def verdict_line(rows: list[Row]) -> str:
    """``all checks passed`` or ``N problems`` (and warnings)."""
    fails = sum(r.verdict == "FAIL" for r in rows)
    warns = sum(r.verdict == "warn" for r in rows)
    warnings = f"{warns} warning{'s' if warns != 1 else ''}"
    if fails:
        return f"{fails} problem{'s' if fails != 1 else ''}" + (f", {warnings}" if warns else "")
    return f"all checks passed, {warnings}" if warns else "all checks passed"
