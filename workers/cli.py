"""The ``deltaflush`` command. It hands off: table administration is ``producer.admin``,
flushing is ``Producer``/``Flusher``, checks are ``workers.doctor``, and what is printed is
``workers.render``.

Errors are one line on stderr (``Error: ...``) naming the setting at fault, with exit code
2 for bad input (an invalid or unknown table name, an invalid setting) and 1 for a failure
(an unreachable Redis or broker, unwritable storage); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click
import pyarrow as pa
import redis

from producer import Producer, admin, shards
from producer.client import connect
from producer.errors import ConfigError, DeltaflushError, InvalidInput
from producer.settings import Settings
from producer.typepolicy import CONVERT, REFUSE

from . import render
from .blame import BROKER, REDIS, STORAGE, SettingFailed, blame, classify, flat
from .logs import configure_logging
from .render import Column
from .scheduler import iter_tables
from .status import table_status, unstick


class Failure(click.ClickException):
    """An error shown as one line, exit code 1."""


class BadInput(Failure):
    """Bad input (a table name, a setting), shown as one line, exit code 2."""

    exit_code = 2


class _Group(click.Group):
    """Turns every error of a command into one line (unless ``--debug``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise _failure(exc) from exc


def _failure(exc: Exception) -> Failure:
    if isinstance(exc, (InvalidInput, ConfigError)):
        return BadInput(flat(exc))
    if isinstance(exc, DeltaflushError) and not isinstance(exc, SettingFailed):
        return Failure(flat(exc))
    try:
        settings = Settings.from_env()
    except DeltaflushError:
        settings = Settings()
    known = classify(exc, settings)
    if known is not None:
        return Failure(str(known))
    return Failure(f"{type(exc).__name__}: {flat(exc)} (--debug shows where)")


def _settings() -> Settings:
    return Settings.from_env()  # a ConfigError names the variable: one line, exit 2


def _client(settings: Settings) -> redis.Redis:
    with blame(REDIS, settings.redis_url, "not a Redis URL"):
        return connect(settings.redis_url)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def main(verbose: bool, debug: bool) -> None:
    """deltaflush: Arrow batches in Redis Streams, flushed to Parquet by a Celery fleet."""
    configure_logging(logging.INFO if verbose else logging.WARNING)


# --- sql -------------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
@click.argument("query")
def sql(as_json: bool, query: str) -> None:
    """Run a DuckDB QUERY in which each table is one consistent snapshot of its lake and its
    delta, e.g. deltaflush sql "SELECT country, count(*) FROM events GROUP BY ALL"."""
    from . import sql as sqlquery

    settings = _settings()
    result = sqlquery.query(Producer(settings=settings, client=_client(settings)), query)
    if as_json:
        click.echo(json.dumps(result.to_pylist(), indent=2, default=str))
        return
    columns = [Column(f.name, pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
                      or pa.types.is_decimal(f.type)) for f in result.schema]
    rows = [["NULL" if v is None else str(v) for v in row.values()]
            for row in result.to_pylist()]
    render.table(columns, rows)
    if render.terminal():
        render.say(f"{result.num_rows} row{'' if result.num_rows == 1 else 's'}", "dim")


# --- status ----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one object per table.")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Refresh every SECONDS until interrupted.")
@click.argument("tables", nargs=-1)
def status(as_json: bool, watch: float | None, tables: tuple[str, ...]) -> None:
    """Per table: pending rows and bytes, age of the oldest pending entry, files and rows
    flushed, dead letters."""
    settings = _settings()
    client = _client(settings)
    names = [admin.require_table(client, settings.key_prefix, t).table for t in tables]
    while True:
        rows = table_status(client, settings.key_prefix, names or None)
        if watch is not None:
            click.clear()
            click.echo(f"deltaflush status, every {watch:g}s (Ctrl-C to stop)")
        if as_json:
            click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        elif not rows:
            click.echo("no tables yet: append to one with producer.Producer().append(...)")
        else:
            render.status(rows)
        if watch is None:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


# --- flush -----------------------------------------------------------------------------


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
    client = _client(settings)
    names = sorted(iter_tables(client, settings.key_prefix)) if all_tables else \
        [admin.require_table(client, settings.key_prefix, str(table)).table]
    if local:
        _flush_here(settings, client, names)
        return
    producer = Producer(settings=settings, client=client)
    try:
        with render.progress("queueing flushes", len(names)) as bar:
            for i, name in enumerate(names, 1):
                with blame(BROKER, settings.broker_url, "cannot queue the flush"):
                    sent = producer.flush(name)
                bar.advance()
                bar.log(f"[{i}/{len(names)}] {name}: "
                        + ("flush queued" if sent else "a flush is already queued"))
    finally:
        producer.close()


def _flush_here(settings: Settings, client: redis.Redis, names: list[str]) -> None:
    """Flush ``names`` in this process, with a bar over their pending rows."""
    from .flusher import Flusher
    from .storage import Storage

    with blame(STORAGE, settings.storage_uri, "not a storage URI"):
        storage = Storage(settings.storage_uri)
    flusher = Flusher(client, storage, settings)
    pending = {s.table: s.pending_rows for s in table_status(client, settings.key_prefix, names)}
    with render.progress("flushing", sum(pending.values())) as bar:
        done = 0
        for i, name in enumerate(names, 1):
            keys = admin.keys_for(settings.key_prefix, name)

            def step(name: str = name, keys: Any = keys, before: int = done) -> bool:
                """Called between the files of a flush: moves the bar on."""
                left = sum(int(client.hget(k.pending, "rows") or 0) for k in
                           shards.table_shards(client, settings.key_prefix, keys.table))
                bar.update(before + max(0, pending[name] - left), f"flushing {name}")
                return False

            result = flusher.flush_shards(name, stop=step)
            done += pending[name]
            bar.update(done)
            bar.log(f"[{i}/{len(names)}] {name}: {result.status}, {result.rows} rows, "
                    f"{result.files} files, {render.size(result.bytes)}")


# --- doctor ----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one object per check.")
def doctor(as_json: bool) -> None:
    """Check that Redis is reachable and keeps data (noeviction, AOF), that the broker is
    reachable and the storage writable: what every worker checks at start. Exits 1 if a
    check fails."""
    from .doctor import FAIL, failed, run_checks

    results = run_checks(_settings())
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in results], indent=2))
    else:
        style = {"ok": "green", "warn": "yellow", FAIL: "bold red"}
        render.table([Column("check"), Column("status"), Column("detail")],
                     [[c.name, c.status, c.detail] for c in results],
                     styles=[style[c.status] for c in results])
    if failed(results):
        sys.exit(1)


# --- exporter --------------------------------------------------------------------------


@main.command()
@click.option("--port", default=9808, show_default=True, help="Port of /metrics.")
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to bind.")
def exporter(port: int, addr: str) -> None:
    """Serve Prometheus metrics for every table at http://ADDR:PORT/metrics."""
    from .metrics import serve

    settings = _settings()
    serve(_client(settings), settings.key_prefix, port, addr)
    click.echo(f"serving deltaflush metrics on http://{addr}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


# --- table -----------------------------------------------------------------------------


@main.group()
def table() -> None:
    """Per-table configuration: layout of the files and flush interval."""


@table.command("set")
@click.argument("name")
@click.option("--partition-by", help="Comma-separated columns, as Hive folders (col=value/); "
              "'' to clear. Fixed once the table has files.")
@click.option("--partition-time", help="A time bucket of a timestamp column: "
              "column:hour|day|month[:folder_key], e.g. ts:day:event_date; '' to clear. "
              "Fixed once the table has files.")
@click.option("--sort-by", help="Comma-separated columns to sort each file by.")
@click.option("--compression", help="zstd (default), snappy, gzip, lz4, brotli or none.")
@click.option("--compression-level", help="Codec level, or 'default'.")
@click.option("--row-group-rows", type=int, help="At most this many rows per row group.")
@click.option("--dictionary", help="Dictionary encoding: auto (string and binary columns, "
              "the default), true (every column) or false.")
@click.option("--statistics/--no-statistics", default=None, help="Column statistics.")
@click.option("--flush-interval", "flush_interval_s", help="Seconds between scheduled "
              "flushes of this table, or 'default'.")
@click.option("--spark-compatible", help="true (the default): write only types Spark reads "
              "too; false: write every type as it is. Fixed once the table has files.")
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
@click.option("--shards", help="Delta streams of the table, each in a slot of its own, "
              "flushed in parallel (more than 1 requires protocol-2 producers; "
              "docs/shards.md).")
@click.option("--shard-key", help="The column whose value picks a row's shard (rows of one "
              "key stay in order); '' for round-robin batches.")
@click.option("--create", is_flag=True, help="Configure a table nothing was appended to yet.")
def table_set(name: str, create: bool, **options: object) -> None:
    """Change TABLE's configuration; workers use it from their next flush."""
    changes = {k: v for k, v in options.items() if v is not None}
    if not changes:
        raise click.UsageError("give at least one setting to change (see --help)")
    settings = _settings()
    client = _client(settings)
    if not create:
        admin.require_table(client, settings.key_prefix, name)
    admin.configure(client, settings.key_prefix, name, changes)
    _show_table(admin.table_info(client, admin.keys_for(settings.key_prefix, name)))


@table.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def table_show(name: str, as_json: bool) -> None:
    """Show TABLE's configuration (defaults where nothing was set), its columns, the
    columns some readers reject and, for a lake table, its snapshot and files."""
    settings = _settings()
    client = _client(settings)
    info = admin.table_info(client, admin.require_table(client, settings.key_prefix, name))
    lake = None
    if info.config.format in ("iceberg", "delta"):  # the lake table, as its sink sees it
        from .maintenance import describe_table

        lake = describe_table(settings, name, info.config)
    if as_json:
        click.echo(json.dumps({**info.as_dict(), "lake": lake}, indent=2, default=str))
    else:
        _show_table(info)
        if lake:
            render.say(f"lake table: {render.lake(lake)}")


def _show_table(info: admin.TableInfo) -> None:
    fixed = {*admin.LAYOUT_SETTINGS, "format"} if info.layout_locked else set()
    defaults = type(info.config)().describe()
    rows = [[key, _value(value), ("fixed: the table has files" if key in fixed else
                                  "default" if defaults[key] == value else "")]
            for key, value in info.config.describe().items()]
    render.table([Column("setting"), Column("value"), Column("")], rows,
                 title=f"table {info.table}: {info.files_flushed} files flushed")
    if info.schema is None:
        render.say("no batch appended yet: no columns")
        return
    notes: dict[str, list[str]] = {}
    for f in info.findings:
        short = {CONVERT: f"written as {f.written_as}", REFUSE: "refused"}.get(
            f.action, "some readers reject it" if "before" not in f.reason else "note")
        notes.setdefault(f.column.split(".")[0].split("[")[0], []).append(short)
    render.table([Column("column"), Column("type"), Column("readers")],
                 [[c.name, str(c.type), "; ".join(notes.get(c.name, [])) or "all read it"]
                  for c in info.schema],
                 styles=["yellow" if c.name in notes else None for c in info.schema])
    for f in info.findings:
        verb = {CONVERT: "converted", REFUSE: "REFUSED"}.get(f.action, "warning")
        render.say(f"{verb}: {f}", "red" if f.action == REFUSE else "yellow")


def _value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    return "-" if value in (None, "") else str(value)


@table.command("unstick")
@click.argument("name")
def table_unstick(name: str) -> None:
    """Clear TABLE's stuck mark, once the cause is fixed, so that flushes run again."""
    settings = _settings()
    client = _client(settings)
    admin.require_table(client, settings.key_prefix, name)
    reasons = [(k, unstick(client, k))  # every shard of a sharded table
               for k in shards.table_shards(client, settings.key_prefix, name)]
    stuck = [(k, r) for k, r in reasons if r is not None]
    if not stuck:
        click.echo(f"{name} was not stuck")
    for k, reason in stuck:
        click.echo(f"{k.stream} unstuck; it was stuck because: {reason}")


@main.command()
@click.argument("table")
def compact(table: str) -> None:
    """Rewrite lake table TABLE's small files into files near its size target, in one
    atomic commit, while flushes go on (iceberg and delta tables)."""
    from .maintenance import compact_table

    settings = _settings()
    client = _client(settings)
    admin.require_table(client, settings.key_prefix, table)
    done = compact_table(settings, table)  # NotALakeTable: a ConfigError, one line
    if done["status"] == "busy":
        click.echo(f"{table}: a maintenance run holds the table; try again later")
        return
    c, info = done.get("compaction", {}), done["table_info"]
    click.echo(f"{table}: {c.get('compacted', 0)} files rewritten into {c.get('written', 0)}; "
               f"now {info['files']} files ({info['small_files']} small), snapshot "
               f"{info['snapshot']}")


# --- dead letters ----------------------------------------------------------------------


@main.group()
def dead() -> None:
    """Entries that could not be flushed (corrupt bytes, impossible schema)."""


@dead.command("list")
@click.argument("table")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_list(table: str, limit: int, as_json: bool) -> None:
    """Show TABLE's dead letters: ID, size and why."""
    settings = _settings()
    client = _client(settings)
    letters, total = admin.dead_letters(
        client, admin.require_table(client, settings.key_prefix, table), limit)
    if as_json:
        click.echo(json.dumps({"table": table, "total": total,
                               "dead_letters": [d.as_dict() for d in letters]}, indent=2))
        return
    if letters:
        render.table([Column("id"), Column("delta id"), Column("size", True), Column("error")],
                     [[d.id, d.origin, render.size(d.size), d.error] for d in letters])
    click.echo(f"{total} dead letters in {table}" + (f", first {limit} shown"
                                                      if total > limit else ""))


@dead.command("replay")
@click.argument("table")
def dead_replay(table: str) -> None:
    """Re-append TABLE's dead letters that now decode and fit the table's schema."""
    settings = _settings()
    client = _client(settings)
    keys = admin.require_table(client, settings.key_prefix, table)
    producer = Producer(settings=settings, client=client)
    try:
        with render.progress(f"replaying dead letters of {table}",
                             int(client.xlen(keys.dead))) as bar:
            replayed, still = producer.replay_dead(table, lambda done, total: bar.update(done))
    finally:
        producer.close()
    click.echo(f"replayed {replayed} dead letters of {table}; {still} still do not decode "
               "or fit the table's schema")


# --- demo ------------------------------------------------------------------------------


@main.command()
@click.option("--seconds", default=15.0, show_default=True, help="How long to produce.")
@click.option("--tables", default=3, show_default=True, help="How many tables to fill.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "iceberg", "delta"]),
              default=None,
              help="Format of the demo's tables (default: DELTAFLUSH_TABLE_FORMAT).")
def demo(seconds: float, tables: int, workers: int, fmt: str | None) -> None:
    """Run the whole pipeline on this machine: producer, Celery worker and beat, then show
    where the Parquet files are."""
    from .demo import run_demo

    sys.exit(run_demo(seconds=seconds, n_tables=tables, concurrency=workers, echo=click.echo,
                      fmt=fmt))


if __name__ == "__main__":  # pragma: no cover
    main()
