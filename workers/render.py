"""How the ``deltaflush`` command shows things: rich tables with colour and progress bars on
a terminal; plain aligned text, no colour and no bars when the output is piped (so that
scripts can read it; ``--json`` is for machines). Rich decides what a terminal is, so
``NO_COLOR`` and ``FORCE_COLOR`` work as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .status import TableStatus


@dataclass(frozen=True)
class Column:
    title: str
    right: bool = False  # numbers are right-aligned


def console() -> Console:
    """A console on this moment's stdout (click's test runner replaces it)."""
    return Console(highlight=False, soft_wrap=False)


def terminal() -> bool:
    return console().is_terminal


def table(columns: Sequence[Column], rows: Sequence[Sequence[str]], title: str = "",
          styles: Sequence[str | None] | None = None) -> None:
    """Print a table; ``styles`` gives each row a rich style (used on a terminal only)."""
    out = console()
    if out.is_terminal:
        shown = Table(title=title or None, title_justify="left", header_style="bold")
        for c in columns:
            shown.add_column(c.title, justify="right" if c.right else "left")
        for i, row in enumerate(rows):
            shown.add_row(*row, style=styles[i] if styles else None)
        out.print(shown)
        return
    if title:
        click.echo(title)
    click.echo(plain(columns, rows))


def plain(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns under a header and a rule, no trailing spaces."""
    lines = [[c.title for c in columns]] + [list(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.rjust(widths[i]) if columns[i].right else
                             cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def say(text: str, style: str | None = None) -> None:
    """One line of text, styled on a terminal."""
    out = console()
    if out.is_terminal:
        out.print(text, style=style, markup=False)
    else:
        click.echo(text)


class Bar:
    """A progress bar's handle: ``advance`` and ``update``; does nothing when piped."""

    def __init__(self, progress: Progress | None, total: float) -> None:
        self._progress = progress
        self._task = progress.add_task("", total=total) if progress is not None else None

    def update(self, completed: float, description: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed)
            if description:
                self._progress.update(self._task, description=description)

    def advance(self, steps: float = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def log(self, text: str) -> None:
        """A line above the bar (or just the line, when piped)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            click.echo(text)


@contextlib.contextmanager
def progress(description: str, total: float) -> Iterator[Bar]:
    """A progress bar for long work, on a terminal; when piped, a ``Bar`` that only logs."""
    out = console()
    if not out.is_terminal:
        yield Bar(None, total)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=out, transient=False) as bar:
        handle = Bar(bar, total)
        handle.update(0, description)
        yield handle


# --- units -------------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


# --- status --------------------------------------------------------------------------------

STATUS_COLUMNS = [Column("table"), Column("pending rows", True), Column("pending bytes", True),
                  Column("oldest pending", True), Column("files", True),
                  Column("rows flushed", True), Column("dead", True), Column("state", True)]
_STATE_STYLE = {"stuck": "bold red", "flushing": "yellow", "pending": "cyan", "idle": "green"}


def status(rows: list[TableStatus]) -> None:
    cells, styles = [], []
    for s in [line for t in rows for line in [t, *(t.shards or [])]]:  # shards under tables
        state = s.state
        cells.append([s.table if s.shard is None or s.shards else f"  {s.table}~{s.shard}",
                      str(s.pending_rows), size(s.pending_bytes),
                      age(s.oldest_pending_age_s), str(s.files_flushed), str(s.rows_flushed),
                      str(s.dead_entries), state])
        styles.append(_STATE_STYLE[state] if state == "stuck" or not s.dead_entries
                      else "red")
    columns = STATUS_COLUMNS
    if any(s.lake for s in rows):  # lake tables: format, snapshot, files (small ones)
        columns = [*columns, Column("lake")]
        for line, s in zip(cells, [x for t in rows for x in [t, *(t.shards or [])]],
                           strict=True):
            line.append(lake(s.lake) if s.shard is None or s.shards else "")
    table(columns, cells, styles=styles)


def lake(described: dict[str, object] | None) -> str:
    """A lake table in a few words: format, snapshot, files (and how many are small)."""
    if not described:
        return "-"
    return (f"{described['format']} @{described['snapshot'] or '-'}: "
            f"{described['files']} files, {described['small_files']} small")
