"""Flush throughput of ``format=delta`` against ``format=parquet`` on the same backlog, and
the latency of a sink commit (a Delta commit, against the parquet format's publish).

    python -m bench.lake_delta [--rows 1000000] [--file-mib 16] [--rounds 5]
                               [--ranges 300] [--range-rows 2000]

Two measurements, each in alternating rounds (parquet then delta, then delta then parquet,
...) so that the drift of a shared, noisy machine falls on both sides:

* **throughput**: a backlog of ``--rows`` rows (the event-table shape of
  ``bench.throughput``) flushed by one ``Flusher`` into files of ``--file-mib`` MiB of Arrow
  data; the ratio is parquet's time over delta's (goal: at least 0.9);
* **commit latency**: ``--ranges`` small ranges (``--range-rows`` rows each, one file each,
  as steady traffic at the default flush interval gives), each sink commit timed; p50 and
  p99 over every round, and the throughput ratio of those small ranges. The Delta table
  grows past delta-rs's checkpoint interval (100 commits), so p99 includes checkpoints.

Starts its own redis-server; ``bench.lake`` (``--format``) may call ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from typing import Any

import pyarrow as pa

from bench.common import backlog, machine, redis_server
from bench.throughput import realistic
from producer import Settings
from producer.client import connect
from workers.flusher import Flusher
from workers.sinks import Committed, Sink, Staged, StageStart, Staging
from workers.sinks.delta import DeltaSink
from workers.sinks.folder import FolderSink
from workers.storage import Storage

FORMATS = ("parquet", "delta")


class Timed:
    """A sink whose commits are timed (the rest is the inner sink's)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.format = inner.format
        self.seconds: list[float] = []

    def stage(self, start: StageStart) -> Staging:
        return self.inner.stage(start)

    def commit(self, staged: Staged) -> Committed:
        started = time.perf_counter()
        try:
            return self.inner.commit(staged)
        finally:
            self.seconds.append(time.perf_counter() - started)

    def discard(self, staged: Staged) -> None:
        self.inner.discard(staged)

    def last_committed(self, table: str, stream: str) -> str | None:
        return self.inner.last_committed(table, stream)


def make_sink(fmt: str, storage: Storage, max_file_bytes: int) -> Timed:
    inner: Sink = (DeltaSink(storage, max_file_bytes) if fmt == "delta"
                   else FolderSink(storage, max_file_bytes))
    return Timed(inner)


def flush_round(url: str, workdir: str, tables: list[pa.Table], max_file_bytes: int,
                fmt: str, tag: str) -> tuple[float, list[float]]:
    """Append ``tables`` as a backlog, flush it into a fresh table of format ``fmt``;
    return the flush's seconds and its commits' seconds."""
    settings = Settings(redis_url=url, max_pending_bytes=0, max_file_bytes=max_file_bytes,
                        table_format=fmt)
    client = connect(url)
    backlog(client, settings, "bench", tables)
    root = os.path.join(workdir, f"{fmt}-{tag}")
    storage = Storage(root)
    sink = make_sink(fmt, storage, max_file_bytes)
    started = time.perf_counter()
    result = Flusher(client, storage, settings, sink=sink).flush("bench")
    seconds = time.perf_counter() - started
    assert result.rows == sum(t.num_rows for t in tables), result
    shutil.rmtree(root)
    client.close()
    return seconds, sink.seconds


def ab(url: str, workdir: str, tables: list[pa.Table], max_file_bytes: int, rounds: int,
       name: str) -> dict[str, Any]:
    """Alternating rounds of both formats; ratios from the best and the median times."""
    times: dict[str, list[float]] = {f: [] for f in FORMATS}
    commits: dict[str, list[float]] = {f: [] for f in FORMATS}
    for r in range(rounds):
        order = FORMATS if r % 2 == 0 else FORMATS[::-1]
        for fmt in order:
            seconds, commit_seconds = flush_round(url, workdir, tables, max_file_bytes, fmt,
                                                  f"{name}-{r}")
            times[fmt].append(seconds)
            commits[fmt].extend(commit_seconds)
    mib = sum(t.nbytes for t in tables) / 2**20
    out: dict[str, Any] = {"rows": sum(t.num_rows for t in tables), "arrow_mib": round(mib, 1),
                           "rounds": rounds}
    for fmt in FORMATS:
        out[f"{fmt}_best_mib_s"] = round(mib / min(times[fmt]), 1)
        out[f"{fmt}_median_mib_s"] = round(mib / statistics.median(times[fmt]), 1)
        out[f"{fmt}_commits"] = len(commits[fmt])
        out[f"{fmt}_commit_p50_ms"] = round(1000 * _quantile(commits[fmt], 0.5), 2)
        out[f"{fmt}_commit_p99_ms"] = round(1000 * _quantile(commits[fmt], 0.99), 2)
    out["ratio_best"] = round(min(times["parquet"]) / min(times["delta"]), 2)
    out["ratio_median"] = round(statistics.median(times["parquet"])
                                / statistics.median(times["delta"]), 2)
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(rows: int, file_mib: int, rounds: int, ranges: int, range_rows: int
        ) -> dict[str, Any]:
    with redis_server("deltaflush-lake-") as (workdir, url):
        big = [realistic(i, 10_000) for i in range(0, rows, 10_000)]
        throughput = ab(url, workdir, big, file_mib * 2**20, rounds, "backlog")
        small = [realistic(i * range_rows, range_rows) for i in range(ranges)]
        # one batch per range: a file size just under one batch's Arrow bytes
        latency = ab(url, workdir, small, max(1024, small[0].nbytes - 1), rounds, "small")
        return {"throughput": throughput, "small_ranges": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file-mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranges", type=int, default=300)
    parser.add_argument("--range-rows", type=int, default=2_000)
    args = parser.parse_args()
    r = run(args.rows, args.file_mib, args.rounds, args.ranges, args.range_rows)
    print(f"machine: {json.dumps(machine())}\n")
    print("| backlog | parquet MiB/s (best / median) | delta MiB/s (best / median) "
          "| ratio (best / median) | commit p50 / p99 ms, parquet | delta |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, m in (("large", r["throughput"]), ("small ranges", r["small_ranges"])):
        print(f"| {label}: {m['rows']} rows, {m['arrow_mib']} MiB, {m['delta_commits']} "
              f"commits over {m['rounds']} rounds | {m['parquet_best_mib_s']} / "
              f"{m['parquet_median_mib_s']} | {m['delta_best_mib_s']} / "
              f"{m['delta_median_mib_s']} | {m['ratio_best']} / {m['ratio_median']} "
              f"| {m['parquet_commit_p50_ms']} / {m['parquet_commit_p99_ms']} "
              f"| {m['delta_commit_p50_ms']} / {m['delta_commit_p99_ms']} |")
    print(f"\n{json.dumps(r)}")


if __name__ == "__main__":
    main()
