"""Lake tables against plain Parquet: flush throughput, commit latency, small files per
table-day before and after compaction, and DuckDB query time over them.

    python -m bench.lake --format iceberg [--rows 2000000] [--rounds 20] [--flushes 720]

* **Throughput.** The same backlog (``bench.throughput.realistic`` rows in batches of 10,000)
  flushed into a ``parquet`` table and into a ``--format`` table by two long-running
  flushers, back to back in each round, alternating which goes first; at the default file
  size and at 8 MiB files (more commits). The ratio is format / parquet throughput over all
  rounds (total times), with the median of the rounds' own ratios and the CPU seconds of
  this process per flush.
* **The day.** ``--flushes`` flushes of ``--rows-per-flush`` rows each, as beat makes them at
  the default 10 s interval (720: two hours of a table-day; 8640: the whole day), one commit
  each, with a maintenance run following the default policy every 60 flushes (every 10
  minutes of the simulated day): commit latency p50/p99 over the flushes, files before
  and after compaction, and DuckDB's query time over the table of small files against the
  same table compacted.

Starts its own redis-server; needs the ``[test]`` extra (DuckDB and its extensions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from typing import Any

from bench.common import machine, redis_server
from bench.throughput import realistic
from producer import Producer, Settings
from producer.client import connect
from producer.tablecfg import TableConfig
from workers import maintenance
from workers.flusher import Flusher
from workers.sinks import Committed, Staged, for_format
from workers.storage import Storage

BATCH_ROWS = 10_000


class Timed:
    """A sink whose commits are timed (every other attribute is the sink's)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit(self, staged: Staged) -> Committed:
        started = time.perf_counter()
        try:
            return self._inner.commit(staged)  # type: ignore[no-any-return]
        finally:
            self.seconds.append(time.perf_counter() - started)


def fill(url: str, settings: Settings, table: str, tables: list[Any]) -> None:
    producer = Producer(settings=settings)
    for i in range(0, len(tables), 64):
        producer.append_many(table, tables[i:i + 64])
    producer.close()


def throughput(url: str, workdir: str, fmt: str, rows: int, rounds: int,
               max_file_bytes: int) -> dict[str, Any]:
    """Two long-running flushers, one per format, each with its own table (created, and its
    catalog connected, before the first round), as in a running worker. Each round fills
    both tables with the backlog and flushes them back to back, in alternating order; the
    ratio is the total time of the parquet flushes over the total of the ``fmt`` flushes
    (slow spells of a shared machine fall on both sides alike), and the median over rounds
    of each round's own ratio."""
    tables = [realistic(i, BATCH_ROWS) for i in range(0, rows, BATCH_ROWS)]
    arrow_mib = sum(t.nbytes for t in tables) / 2**20
    client = connect(url)
    client.flushall()
    sides = ("parquet", fmt)
    flushers, settings = {}, {}
    for side in sides:
        root = os.path.join(workdir, side)
        settings[side] = Settings(redis_url=url, storage_uri=root, table_format=side,
                                  max_pending_bytes=0, max_file_bytes=max_file_bytes)
        flushers[side] = Flusher(client, Storage(root), settings[side])
        fill(url, settings[side], side, tables[:1])
        flushers[side].flush(side)
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    files = 0
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            fill(url, settings[side], side, tables)
            started, cpu_started = time.perf_counter(), time.process_time()
            result = flushers[side].flush(side)
            times[side].append(time.perf_counter() - started)
            cpu[side].append(time.process_time() - cpu_started)  # this process's threads
            assert result.rows == rows, result
            files = result.files
    for side in sides:
        shutil.rmtree(os.path.join(workdir, side))
    client.close()
    paired = [p / f for p, f in zip(times["parquet"], times[fmt], strict=True)]
    return {"arrow_mib": round(arrow_mib), "files": files, "rounds": rounds,
            "parquet_mib_s": round(rounds * arrow_mib / sum(times["parquet"]), 1),
            f"{fmt}_mib_s": round(rounds * arrow_mib / sum(times[fmt]), 1),
            "ratio": round(sum(times["parquet"]) / sum(times[fmt]), 2),
            "ratio_median": round(statistics.median(paired), 2),
            "ratio_rounds": [round(x, 2) for x in paired],
            "cpu_s_per_flush": {side: round(sum(c) / rounds, 3) for side, c in cpu.items()},
            "spread": {side: [round(arrow_mib / t, 1) for t in ts] for side, ts in times.items()}}


def duckdb_source(fmt: str, sink: Any, storage: Storage, table: str) -> str:
    """The DuckDB table function reading ``table`` in its format."""
    if fmt == "iceberg":
        return f"iceberg_scan('{sink.load(table).metadata_location}')"
    if fmt == "delta":
        return f"delta_scan('{storage.table_dir(table)}')"
    return f"read_parquet('{storage.table_dir(table)}/**/*.parquet')"


def query_seconds(source: str, repeat: int = 5) -> dict[str, float]:
    import duckdb

    from tests.lake import extension_directory

    con = duckdb.connect(config={"extension_directory": extension_directory(),
                                 "autoinstall_known_extensions": False})
    for ext in ("avro", "iceberg", "delta"):
        try:
            con.execute(f"LOAD {ext}")
        except duckdb.Error:
            pass
    queries = {"aggregate": f"SELECT country, count(*), avg(price) FROM {source} GROUP BY 1",
               "selective": f"SELECT count(*) FROM {source} WHERE event_id BETWEEN 1000 AND 2000"}
    out = {}
    for name, sql in queries.items():
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            con.execute(sql).fetchall()
            best = min(best, time.perf_counter() - started)
        out[name] = round(best, 3)
    con.close()
    return out


def day(url: str, workdir: str, fmt: str, flushes: int, rows_per_flush: int) -> dict[str, Any]:
    client = connect(url)
    client.flushall()
    root = os.path.join(workdir, f"day-{fmt}")
    settings = Settings(redis_url=url, storage_uri=root, table_format=fmt,
                        max_pending_bytes=0)
    storage = Storage(root)
    sink = Timed(for_format(fmt, storage, settings))
    flusher = Flusher(client, storage, settings, sink=sink)  # type: ignore[arg-type]
    producer = Producer(settings=settings)
    maintained = 0
    for i in range(flushes):
        producer.append("day", realistic(i * rows_per_flush, rows_per_flush))
        flusher.flush("day")
        if (i + 1) % 60 == 0 and i + 1 < flushes:  # every 10 minutes of the simulated day
            maintenance.maintain(client, flusher, "day")
            maintained += 1
    producer.close()
    config = TableConfig.from_json(client.get("deltaflush:{day}:config"))
    lake = maintenance.maintainable(sink._inner)
    assert lake is not None
    before = lake.describe("day", config)
    queries_before = query_seconds(duckdb_source(fmt, sink._inner, storage, "day"))
    # the same day without maintenance: one file per flush (unpartitioned)
    compacted = maintenance.maintain(client, flusher, "day", compact=True)
    after = lake.describe("day", config)
    queries_after = query_seconds(duckdb_source(fmt, sink._inner, storage, "day"))
    latencies = sorted(sink.seconds)
    client.close()
    shutil.rmtree(root)
    return {"flushes": flushes, "rows_per_flush": rows_per_flush,
            "maintenance_runs": maintained,
            "commit_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "commit_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
            "commit_first_ms": round(1000 * statistics.median(latencies[:20]), 1),
            "commit_last_ms": round(1000 * statistics.median(sink.seconds[-20:]), 1),
            "files_without_compaction": flushes,
            "files_with_policy": before.files, "small_with_policy": before.small_files,
            "files_compacted": after.files, "compaction": compacted.get("compaction"),
            "query_s_with_policy": queries_before, "query_s_compacted": queries_after}


def small_files_query(url: str, workdir: str, fmt: str, flushes: int,
                      rows_per_flush: int) -> dict[str, Any]:
    """The DuckDB query over ``flushes`` small files (no maintenance), then compacted."""
    client = connect(url)
    client.flushall()
    root = os.path.join(workdir, f"small-{fmt}")
    settings = Settings(redis_url=url, storage_uri=root, table_format=fmt,
                        max_pending_bytes=0)
    storage = Storage(root)
    sink = for_format(fmt, storage, settings)
    flusher = Flusher(client, storage, settings, sink=sink)
    producer = Producer(settings=settings)
    for i in range(flushes):
        producer.append("small", realistic(i * rows_per_flush, rows_per_flush))
        flusher.flush("small")
    producer.close()
    small = query_seconds(duckdb_source(fmt, sink, storage, "small"))
    done = maintenance.maintain(client, flusher, "small", compact=True)
    compacted = query_seconds(duckdb_source(fmt, sink, storage, "small"))
    client.close()
    shutil.rmtree(root)
    return {"files": flushes, "files_compacted": done["table_info"]["files"],
            "query_s_small_files": small, "query_s_compacted": compacted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", dest="fmt", default="iceberg", choices=["iceberg", "delta"])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--flushes", type=int, default=720)
    parser.add_argument("--rows-per-flush", type=int, default=2_000)
    parser.add_argument("--throughput-only", action="store_true",
                        help="skip the table-day and the small-files query")
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "format": args.fmt}
    with redis_server() as (workdir, url):
        for label, size in (("default files (128 MiB)", 128 * 2**20), ("8 MiB files", 8 << 20)):
            out[f"throughput, {label}"] = throughput(url, workdir, args.fmt, args.rows,
                                                     args.rounds, size)
            print(label, json.dumps(out[f"throughput, {label}"]), flush=True)
        if args.throughput_only:
            print(json.dumps(out, indent=2))
            return
        out["day"] = day(url, workdir, args.fmt, args.flushes, args.rows_per_flush)
        print("day", json.dumps(out["day"]), flush=True)
        out["small files"] = small_files_query(url, workdir, args.fmt, args.flushes,
                                               args.rows_per_flush)
        print("small files", json.dumps(out["small files"]), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
