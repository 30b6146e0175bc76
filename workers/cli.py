"""The ``deltaflush`` command: status, flush, demo."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import cast

import click

from producer import Producer, wire
from producer.client import connect
from producer.errors import DeltaflushError, InvalidTableName
from producer.settings import Settings

from .logs import configure_logging
from .scheduler import iter_tables
from .status import TableStatus, table_status, unstick


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except DeltaflushError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """deltaflush: Arrow batches in Redis Streams, flushed to Parquet by a Celery fleet."""
    configure_logging(logging.INFO if verbose else logging.WARNING)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def render(rows: list[TableStatus]) -> str:
    header: tuple[str, ...] = ("table", "pending rows", "pending bytes", "oldest pending",
                               "files", "rows flushed", "dead", "state")
    lines: list[tuple[str, ...]] = [header] + [
        (s.table, str(s.pending_rows), _bytes(s.pending_bytes), _age(s.oldest_pending_age_s),
         str(s.files_flushed), str(s.rows_flushed), str(s.dead_entries),
         s.state)
        for s in rows
    ]
    if any(s.lake for s in rows):  # lake tables: format, snapshot, files (small ones)
        header = (*header, "lake")
        lines = [header] + [(*line, _lake(s.lake)) for line, s in
                            zip(lines[1:], rows, strict=True)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                             for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _lake(lake: dict[str, object] | None) -> str:
    if not lake:
        return "-"
    return (f"{lake['format']} @{lake['snapshot'] or '-'}: {lake['files']} files, "
            f"{lake['small_files']} small")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one object per table.")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Refresh every SECONDS until interrupted.")
@click.argument("tables", nargs=-1)
def status(as_json: bool, watch: float | None, tables: tuple[str, ...]) -> None:
    """Per table: pending rows and bytes, age of the oldest pending entry, files and rows
    flushed, dead letters."""
    settings = _settings()
    client = connect(settings.redis_url)
    while True:
        rows = table_status(client, settings.key_prefix, list(tables) or None)
        if as_json:
            text = json.dumps([r.as_dict() for r in rows], indent=2)
        elif not rows:
            text = "no tables yet: append to one with producer.Producer().append(...)"
        else:
            text = render(rows)
        if watch is None:
            click.echo(text)
            return
        click.clear()
        click.echo(f"deltaflush status, every {watch:g}s (Ctrl-C to stop)\n{text}")
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


@main.command()
@click.argument("table", required=False)
@click.option("--all", "all_tables", is_flag=True, help="Flush every known table.")
@click.option("--local", is_flag=True,
              help="Flush in this process instead of asking the Celery workers.")
def flush(table: str | None, all_tables: bool, local: bool) -> None:
    """Flush TABLE (or --all) now: queue flush_table for the workers, or run it --local."""
    if bool(table) == all_tables:
        raise click.UsageError("give either a TABLE or --all")
    settings = _settings()
    client = connect(settings.redis_url)
    names = sorted(iter_tables(client, settings.key_prefix)) if all_tables else [str(table)]
    if local:
        from .flusher import Flusher
        from .storage import Storage

        flusher = Flusher(client, Storage(settings.storage_uri), settings)
        for i, name in enumerate(names, 1):
            result = flusher.flush(name)
            click.echo(f"[{i}/{len(names)}] {name}: {result.status}, {result.rows} rows, "
                       f"{result.files} files, {_bytes(result.bytes)}")
        return
    producer = Producer(settings=settings, client=client)
    try:
        for i, name in enumerate(names, 1):
            sent = producer.flush(name)
            click.echo(f"[{i}/{len(names)}] {name}: "
                       + ("flush queued" if sent else "a flush is already queued"))
    except DeltaflushError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        producer.close()


@main.command()
@click.option("--port", default=9808, show_default=True, help="Port of /metrics.")
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to bind.")
def exporter(port: int, addr: str) -> None:
    """Serve Prometheus metrics for every table at http://ADDR:PORT/metrics."""
    from .metrics import serve

    settings = _settings()
    serve(connect(settings.redis_url), settings.key_prefix, port, addr)
    click.echo(f"serving deltaflush metrics on http://{addr}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@main.group()
def table() -> None:
    """Per-table configuration: layout of the files and flush interval."""


@table.command("set")
@click.argument("name")
@click.option("--partition-by", help="Comma-separated columns, as Hive folders (col=value/); "
              "'' to clear.")
@click.option("--partition-time", help="A time bucket of a timestamp column: "
              "column:hour|day|month[:folder_key], e.g. ts:day:event_date; '' to clear.")
@click.option("--sort-by", help="Comma-separated columns to sort each file by.")
@click.option("--compression", help="zstd (default), snappy, gzip, lz4, brotli or none.")
@click.option("--compression-level", help="Codec level, or 'default'.")
@click.option("--row-group-rows", type=int, help="At most this many rows per row group.")
@click.option("--dictionary", help="Dictionary encoding: auto (string and binary columns, "
              "the default), true (every column) or false.")
@click.option("--statistics/--no-statistics", default=None, help="Column statistics.")
@click.option("--flush-interval", "flush_interval_s", help="Seconds between scheduled "
              "flushes of this table, or 'default'.")
@click.option("--format", "format", help="parquet, iceberg or delta (fixed once the table has "
              "flushed data).")
@click.option("--target-file-bytes", help="Lake tables: size compaction packs files up to.")
@click.option("--compact-min-small-files", help="Lake tables: compact once this many files "
              "are under half the target.")
@click.option("--snapshot-retention", "snapshot_retention_s", help="Lake tables: seconds "
              "snapshots are kept.")
@click.option("--orphan-retention", "orphan_retention_s", help="Lake tables: seconds before "
              "an unreferenced file is removed.")
@click.option("--maintenance-interval", "maintenance_interval_s", help="Lake tables: seconds "
              "between maintenance runs.")
def table_set(name: str, **options: object) -> None:
    """Change TABLE's configuration; workers use it from their next flush."""
    changes = {k: v for k, v in options.items() if v is not None}
    if not changes:
        raise click.UsageError("give at least one setting to change (see --help)")
    producer = Producer(settings=_settings())
    try:
        config = producer.configure(name, **changes)
    except DeltaflushError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        producer.close()
    click.echo(json.dumps(config.describe(), indent=2))


@table.command("show")
@click.argument("name")
def table_show(name: str) -> None:
    """Print TABLE's configuration (defaults where nothing was set); for a lake table also
    its current snapshot, files and small files ("lake")."""
    settings = _settings()
    producer = Producer(settings=settings)
    try:
        config = producer.table_config(name)
    except DeltaflushError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        producer.close()
    shown = config.describe()
    if config.format in ("iceberg", "delta"):
        from .maintenance import describe_table

        shown["lake"] = describe_table(settings, name, config)
    click.echo(json.dumps(shown, indent=2, default=str))


@table.command("unstick")
@click.argument("name")
def table_unstick(name: str) -> None:
    """Clear TABLE's stuck mark, once the cause is fixed, so that flushes run again."""
    settings = _settings()
    if not wire.valid_table_name(name):
        raise click.UsageError(str(InvalidTableName(name)))
    reason = unstick(connect(settings.redis_url), wire.Keys(settings.key_prefix, name))
    click.echo(f"{name} was not stuck" if reason is None else
               f"{name} unstuck; it was stuck because: {reason}")


@main.command()
@click.argument("table")
def compact(table: str) -> None:
    """Rewrite lake table TABLE's small files into files near its size target, in one
    atomic commit, while flushes go on (iceberg and delta tables)."""
    from .maintenance import NotALakeTable, compact_table

    settings = _settings()
    if not wire.valid_table_name(table):
        raise click.UsageError(str(InvalidTableName(table)))
    try:
        done = compact_table(settings, table)
    except NotALakeTable as exc:
        raise click.UsageError(str(exc)) from exc
    if done["status"] == "busy":
        click.echo(f"{table}: a maintenance run holds the table; try again later")
        return
    c, info = done.get("compaction", {}), done["table_info"]
    click.echo(f"{table}: {c.get('compacted', 0)} files rewritten into {c.get('written', 0)}; "
               f"now {info['files']} files ({info['small_files']} small), snapshot "
               f"{info['snapshot']}")


@main.group()
def dead() -> None:
    """Entries that could not be flushed (corrupt bytes, impossible schema)."""


@dead.command("list")
@click.argument("table")
@click.option("--limit", default=100, show_default=True)
def dead_list(table: str, limit: int) -> None:
    """Show TABLE's dead letters: ID, size and why."""
    settings = _settings()
    if not wire.valid_table_name(table):
        raise click.UsageError(str(InvalidTableName(table)))
    client = connect(settings.redis_url)
    keys = wire.Keys(settings.key_prefix, table)
    entries = cast(list[wire.Entry], client.xrange(keys.dead, count=limit))
    total = client.xlen(keys.dead)
    for entry_id, fields in entries:
        size = len(fields.get(wire.FIELD_ARROW, b""))
        error = fields.get(wire.FIELD_ERROR, b"").decode(errors="replace")
        origin = fields.get(wire.FIELD_ENTRY_ID, b"?").decode()
        click.echo(f"{entry_id.decode()}  (delta {origin}, {_bytes(size)}): {error}")
    click.echo(f"{total} dead letters in {table}" + (f", first {limit} shown"
                                                      if total > limit else ""))


@dead.command("replay")
@click.argument("table")
def dead_replay(table: str) -> None:
    """Re-append TABLE's dead letters that now decode and fit the table's schema."""
    settings = _settings()
    producer = Producer(settings=settings)

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            click.echo(f"[{done}/{total}] dead letters of {table} tried", err=True)

    try:
        replayed, still = producer.replay_dead(table, progress)
    except DeltaflushError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        producer.close()
    click.echo(f"replayed {replayed} dead letters of {table}; {still} still do not decode "
               "or fit the table's schema")


@main.command()
@click.option("--seconds", default=15.0, show_default=True, help="How long to produce.")
@click.option("--tables", default=3, show_default=True, help="How many tables to fill.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "iceberg"]), default=None,
              help="Format of the demo's tables (default: DELTAFLUSH_TABLE_FORMAT).")
def demo(seconds: float, tables: int, workers: int, fmt: str | None) -> None:
    """Run the whole pipeline on this machine: producer, Celery worker and beat, then show
    where the Parquet files are."""
    from .demo import run_demo

    sys.exit(run_demo(seconds=seconds, n_tables=tables, concurrency=workers, echo=click.echo,
                      fmt=fmt))


if __name__ == "__main__":  # pragma: no cover
    main()
