"""Reads of both tiers (``Producer.read``): latency against the pending backlog, the time
from ``append`` to visible, and read throughput from the delta against Parquet.

    python -m bench.reads [--format parquet] [--lake-rows 1000000]
                          [--backlogs 0,10000,100000,1000000] [--samples 200]

* **Latency against the backlog.** A table with ``--lake-rows`` rows flushed and a pending
  backlog of each size (``bench.throughput.realistic`` rows in batches of 10,000): the
  time to the first batch and to the whole read (every column), and to a read of one
  column with a selective filter (``event_id == x``), median of 5.
* **Append to visible.** A producer appends one 100-row batch at a time while a flusher
  thread flushes the table every 0.2 s (real commits, trims and files); each append is
  followed by reads filtered on the batch's first ``event_id`` until one holds it: the
  time from the start of the ``append`` call to the end of that read. Read-your-writes
  makes the first read hold it; the distribution is of ``append`` + one read.
* **Throughput.** The same rows read whole from the delta (nothing flushed) and from the
  lake (all flushed), by ``p.read``, and from the lake's files by pyarrow alone.

Starts its own redis-server and storage folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from bench.common import machine, redis_server
from bench.throughput import realistic
from producer import Producer, Settings
from producer.client import connect
from workers.flusher import Flusher
from workers.storage import Storage

BATCH_ROWS = 10_000


def _fresh_table(url: str, lake: str, fmt: str, table: str) -> Producer:
    """A producer writing to ``lake`` on an emptied Redis, with ``table`` a ``fmt`` table."""
    connect(url).flushall()
    p = Producer(settings=Settings(redis_url=url, storage_uri=lake, table_format=fmt))
    p.configure(table, format=fmt)
    return p


def _fill(p: Producer, table: str, start: int, rows: int) -> int:
    """Append ``rows`` rows in batches of ``BATCH_ROWS``; return the next id."""
    batches = [realistic(i, min(BATCH_ROWS, start + rows - i))
               for i in range(start, start + rows, BATCH_ROWS)]
    for i in range(0, len(batches), 20):
        p.append_many(table, batches[i:i + 20])
    return start + rows


def _flush(url: str, lake: str, fmt: str, table: str) -> None:
    Flusher(connect(url), Storage(lake), Settings(redis_url=url, storage_uri=lake,
                                                  table_format=fmt)).flush(table)


def _timed_read(p: Producer, table: str, **kw: Any) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds to the end, rows)."""
    started = time.perf_counter()
    reader = p.read(table, **kw)
    first = None
    rows = 0
    for batch in reader:
        if first is None:
            first = time.perf_counter() - started
        rows += batch.num_rows
    total = time.perf_counter() - started
    return (first if first is not None else total), total, rows


def latency(url: str, workdir: str, fmt: str, lake_rows: int, backlogs: list[int]
            ) -> list[dict[str, Any]]:
    out = []
    for backlog in backlogs:
        lake = os.path.join(workdir, f"lake-latency-{backlog}")
        table = "events"
        p = _fresh_table(url, lake, fmt, table)
        nxt = _fill(p, table, 0, lake_rows)
        _flush(url, lake, fmt, table)
        _fill(p, table, nxt, backlog)
        pending = int(connect(url).hget(f"deltaflush:{{{table}}}:pending", "bytes") or 0)
        whole = [_timed_read(p, table) for _ in range(5)]
        probe = pc.field("event_id") == lake_rows + backlog // 2
        one = [_timed_read(p, table, columns=["event_id"], filter=probe)[1] for _ in range(5)]
        row = {"backlog_rows": backlog, "backlog_mib": round(pending / 2**20, 1),
               "lake_rows": lake_rows,
               "first_batch_s": round(statistics.median(w[0] for w in whole), 4),
               "whole_read_s": round(statistics.median(w[1] for w in whole), 3),
               "rows_read": whole[0][2],
               "filtered_one_column_s": round(statistics.median(one), 4)}
        print("latency", json.dumps(row), flush=True)
        out.append(row)
        p.close()
        shutil.rmtree(lake, ignore_errors=True)
    return out


def visible(url: str, workdir: str, fmt: str, samples: int, lake_rows: int) -> dict[str, Any]:
    lake = os.path.join(workdir, "lake-visible")
    table = "events"
    p = _fresh_table(url, lake, fmt, table)
    nxt = _fill(p, table, 0, lake_rows)
    _flush(url, lake, fmt, table)
    done = threading.Event()
    flushes = [0]

    def flusher() -> None:
        while not done.wait(0.2):
            _flush(url, lake, fmt, table)
            flushes[0] += 1

    thread = threading.Thread(target=flusher, daemon=True)
    thread.start()
    seconds, reads = [], []
    try:
        for _ in range(samples):
            batch = realistic(nxt, 100)
            started = time.perf_counter()
            p.append(table, batch)
            tries = 0
            while True:
                tries += 1
                got = p.read(table, columns=["event_id"],
                             filter=pc.field("event_id") == nxt).read_all()
                if got.num_rows:
                    break
            seconds.append(time.perf_counter() - started)
            reads.append(tries)
            nxt += 100
    finally:
        done.set()
        thread.join()
    seconds.sort()

    def q(f: float) -> float:
        return round(seconds[min(len(seconds) - 1, int(f * len(seconds)))] * 1000, 2)

    row = {"samples": samples, "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
           "max_ms": round(seconds[-1] * 1000, 2), "reads_per_sample_max": max(reads),
           "flushes_meanwhile": flushes[0], "lake_rows": lake_rows}
    print("visible", json.dumps(row), flush=True)
    p.close()
    shutil.rmtree(lake, ignore_errors=True)
    return row


def throughput(url: str, workdir: str, fmt: str, rows: int) -> dict[str, Any]:
    lake = os.path.join(workdir, "lake-throughput")
    table = "events"
    p = _fresh_table(url, lake, fmt, table)
    _fill(p, table, 0, rows)
    nbytes = p.read(table).read_all().nbytes

    def best(fn: Any) -> float:
        return min(fn() for _ in range(3))

    def read_all() -> float:
        started = time.perf_counter()
        assert p.read(table).read_all().num_rows == rows
        return time.perf_counter() - started

    delta_s = best(read_all)
    _flush(url, lake, fmt, table)
    lake_s = best(read_all)
    files = [str(f) for f in sorted((Path(lake) / table).rglob("*.parquet"))
             if "_delta_log" not in str(f)]

    def pyarrow_alone() -> float:
        started = time.perf_counter()
        ds.dataset(files, format="parquet").to_table()
        return time.perf_counter() - started

    raw_s = best(pyarrow_alone) if fmt == "parquet" else None
    row = {"rows": rows, "arrow_mib": round(nbytes / 2**20, 1),
           "delta_s": round(delta_s, 3), "delta_rows_per_s": int(rows / delta_s),
           "lake_s": round(lake_s, 3), "lake_rows_per_s": int(rows / lake_s),
           "pyarrow_parquet_s": None if raw_s is None else round(raw_s, 3)}
    print("throughput", json.dumps(row), flush=True)
    p.close()
    shutil.rmtree(lake, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", dest="fmt", default="parquet",
                        choices=["parquet", "iceberg", "delta"])
    parser.add_argument("--lake-rows", type=int, default=1_000_000)
    parser.add_argument("--backlogs", default="0,10000,100000,1000000")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--throughput-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "format": args.fmt,
                           "load_before": os.getloadavg()}
    with redis_server() as (workdir, url):
        out["latency"] = latency(url, workdir, args.fmt, args.lake_rows,
                                 [int(b) for b in args.backlogs.split(",")])
        out["visible"] = visible(url, workdir, args.fmt, args.samples, 100_000)
        out["throughput"] = throughput(url, workdir, args.fmt, args.throughput_rows)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
