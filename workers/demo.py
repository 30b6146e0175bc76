"""``deltaflush demo``: the whole pipeline on one machine, nothing to install.

Without ``DELTAFLUSH_REDIS_URL`` an embedded Redis-compatible server (fakeredis over TCP, Lua
included) runs in this process. A Celery worker and beat run as subprocesses through the
standard ``celery -A workers.app ...`` commands; this process produces for a while, asks for
a final flush, waits until every table is drained, reads the Parquet files back and checks
that every row appended in this run is there exactly once.

Each run starts from a clean state: it writes into a folder of its own under
``DELTAFLUSH_STORAGE_URI`` (``./data/demo-<time>/``), so rows never pile up across runs and
the counts it prints are this run's; earlier runs' folders are kept. With the embedded
server Redis is new too; with ``DELTAFLUSH_REDIS_URL`` the demo says that it reuses that
Redis and its ``demo_events_*`` tables. It ends with a command that reads the files back
with what this environment has (pyarrow always; DuckDB and polars if installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from producer import Producer
from producer.client import connect
from producer.settings import Settings

from .catalog import catalog_uri
from .embedded import embedded_redis
from .status import table_status
from .storage import Storage


def _batch(run: str, table: int, seq: int, rows: int) -> pa.Table:
    now = time.time()
    ids = pa.array(range(seq * rows, (seq + 1) * rows), pa.int64())
    return pa.table({
        "run": pa.array([run] * rows),
        "id": ids,
        "ts": pa.array([int(now * 1e6)] * rows, pa.timestamp("us", tz="UTC")),
        "user": pa.array([f"user{(i * 7919 + table) % 1000}" for i in range(rows)]),
        "value": pc.multiply(pc.cast(ids, pa.float64()), 0.5),
    })


def run_folder(storage_uri: str, name: str) -> str:
    """``storage_uri`` with ``name`` as a last path segment (before a URI's query)."""
    path, sep, query = storage_uri.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def run_demo(seconds: float, n_tables: int, concurrency: int,
             echo: Callable[[str], None] = print, fmt: str | None = None) -> int:
    env = dict(os.environ)
    if fmt:  # the format of the demo's tables (new tables take the default format)
        env["DELTAFLUSH_TABLE_FORMAT"] = fmt
    env.setdefault("DELTAFLUSH_FLUSH_INTERVAL_S", "2")
    env["DELTAFLUSH_STORAGE_URI"] = run_folder(
        env.get("DELTAFLUSH_STORAGE_URI") or "./data",
        time.strftime("demo-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4])
    with contextlib.ExitStack() as stack:
        if not env.get("DELTAFLUSH_REDIS_URL"):
            env["DELTAFLUSH_REDIS_URL"] = stack.enter_context(embedded_redis())
            # In memory by design: the workers' durability check need not warn about it.
            env["DELTAFLUSH_ALLOW_VOLATILE_REDIS"] = "1"
            echo(f"embedded Redis-compatible server at {env['DELTAFLUSH_REDIS_URL']} "
                 "(in memory, new for this run)")
        else:
            echo("using the Redis at DELTAFLUSH_REDIS_URL; its tables demo_events_* are "
                 "reused: rows an earlier run left unflushed land in this run's folder")
        settings = Settings.from_env(env)
        storage = Storage(settings.storage_uri)
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="deltaflush-demo-"))
        celery = [sys.executable, "-m", "celery", "--quiet", "-A", "workers.app"]
        procs = [
            subprocess.Popen(celery + ["worker", "-c", str(concurrency), "--loglevel=WARNING",
                                       "-n", f"demo-{uuid.uuid4().hex[:6]}@%h"], env=env),
            subprocess.Popen(celery + ["beat", "--loglevel=WARNING",
                                       "-s", os.path.join(workdir, "beat-schedule")], env=env),
        ]
        stack.callback(_stop, procs)
        echo(f"worker ({concurrency} processes) and beat started; flush interval "
             f"{settings.flush_interval_s:g}s; this run writes to "
             f"{storage.display(storage.root)} (earlier runs' folders are kept)")
        return _produce_and_check(settings, storage, seconds, n_tables, echo)
    return 1  # pragma: no cover


def _produce_and_check(settings: Settings, storage: Storage, seconds: float, n_tables: int,
                       echo: Callable[[str], None]) -> int:
    run = uuid.uuid4().hex[:12]
    tables = [f"demo_events_{i}" for i in range(n_tables)]
    producer = Producer(settings=settings)
    client = connect(settings.redis_url)
    appended = dict.fromkeys(tables, 0)
    start = time.monotonic()
    seq = 0
    next_report = start
    while time.monotonic() - start < seconds:
        for t, table in enumerate(tables):
            producer.append_many(table, [_batch(run, t, seq * 4 + k, 500) for k in range(4)])
            appended[table] += 2000
        seq += 1
        if time.monotonic() >= next_report:
            next_report += 2
            _report(client, settings, tables, appended, echo, "producing")
        time.sleep(0.05)
    echo(f"produced {sum(appended.values())} rows into {n_tables} tables; asking for a "
         "final flush")
    for table in tables:
        producer.flush(table)
    deadline = time.monotonic() + max(45.0, settings.lease_s * 2)
    while time.monotonic() < deadline:
        rows = table_status(client, settings.key_prefix, tables)
        if all(s.pending_entries == 0 and not s.flushing for s in rows):
            break
        _report(client, settings, tables, appended, echo, "draining")
        time.sleep(1)
    else:
        echo("timed out waiting for the workers to drain the tables")
        return 1
    ok = True
    fmt = settings.table_format
    lake = fmt in ("iceberg", "delta")
    shown = {"iceberg": "Iceberg", "delta": "Delta"}.get(fmt, "Parquet")
    for table in tables:
        if fmt == "iceberg":
            got, files = _iceberg_ids(settings, storage, table, run)
        elif fmt == "delta":
            got, files = _delta_ids(storage, table, run)
        else:
            data = ds.dataset(storage.table_dir(table), filesystem=storage.fs, format="parquet")
            got = data.to_table(columns=["id"], filter=ds.field("run") == run)["id"]
            files = len(storage.list_files(table))
        unique = len(pc.unique(got))
        status = "ok" if len(got) == unique == appended[table] else "MISMATCH"
        ok &= status == "ok"
        echo(f"  {table}: appended {appended[table]}, in {shown} {len(got)} "
             f"({unique} distinct), {files} files: {status}")
    if fmt == "delta":
        echo(f"Delta tables are under {storage.display(storage.root)}/<table>/ (their logs in "
             "<table>/_delta_log); read them as docs/lake-delta.md shows")
    elif lake:
        echo(f"Iceberg tables {settings.catalog_namespace}.<table> are in the catalog "
             f"{catalog_uri(settings, storage)}, their files under "
             f"{storage.display(storage.root)}/<table>/; read them as docs/lake.md shows")
    else:
        echo(f"Parquet files are under {storage.display(storage.root)}/<table>/; count "
             "their rows with:")
        for command in reading_commands(storage):
            echo(f"  {command}")
    producer.close()
    return 0 if ok else 1


def reading_commands(storage: Storage) -> list[str]:
    """Commands that read the run's files back, each with a reader this environment has
    (the package brings pyarrow and DuckDB; polars only if it is installed)."""
    root = storage.display(storage.root)
    codes = [f'import pyarrow.dataset as ds; print(ds.dataset("{root}", '
             'partitioning="hive").count_rows())']
    glob = f"{root}/*/**/*.parquet"
    if storage.local and importlib.util.find_spec("duckdb"):
        codes.append(f'import duckdb; print(duckdb.read_parquet("{glob}", '
                     'hive_partitioning=True).aggregate("count(*)").fetchall()[0][0])')
    if storage.local and importlib.util.find_spec("polars"):
        codes.append(f'import polars as pl; print(pl.scan_parquet("{glob}", '
                     'hive_partitioning=True).select(pl.len()).collect().item())')
    return [f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}" for code in codes]


def _iceberg_ids(settings: Settings, storage: Storage, table: str, run: str
                 ) -> tuple[pa.ChunkedArray, int]:
    """The ids of this run in an Iceberg table's current snapshot, and its data files."""
    from .sinks.iceberg import IcebergSink

    found = IcebergSink(storage, settings).load(table)
    if found is None:
        return pa.chunked_array([], pa.int64()), 0
    scan = found.scan(row_filter=f"run == '{run}'", selected_fields=("id",))
    return scan.to_arrow()["id"], len(list(found.scan().plan_files()))


def _delta_ids(storage: Storage, table: str, run: str) -> tuple[pa.ChunkedArray, int]:
    """The ids of this run in a Delta table's latest version, and its data files."""
    from .sinks.delta_table import location

    found = location(storage, table).open()
    if found is None:
        return pa.chunked_array([], pa.int64()), 0
    data = found.to_pyarrow_dataset()
    got = data.to_table(columns=["id"], filter=ds.field("run") == run)["id"]
    return got, len(found.file_uris())


def _report(client, settings, tables, appended, echo, phase) -> None:  # type: ignore[no-untyped-def]
    rows = table_status(client, settings.key_prefix, tables)
    pending = sum(s.pending_rows for s in rows)
    flushed = sum(s.rows_flushed for s in rows)
    files = sum(s.files_flushed for s in rows)
    echo(f"[{phase}] appended {sum(appended.values()):>8} rows | pending {pending:>7} | "
         f"flushed {flushed:>8} rows in {files} files")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
