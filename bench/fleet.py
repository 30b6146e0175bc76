"""Fleet benchmarks with real ``celery -A workers.app worker`` processes.

* scale-out: 1, 2 and 4 worker processes draining the same backlog spread over 4 tables;
  rows per second from the first ``flush_table`` sent to the last commit (best of 3),
  beside pyarrow alone doing the same work from memory in as many processes: the limit of
  this machine.
* freshness: a steady append load with beat running; for each batch, the time from
  ``append`` returning to its rows being in a published Parquet file; p50 and p99.

    python -m bench.fleet [--rows-per-table 500000] [--freshness-s 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.common import CELERY, machine, redis_server, start_worker
from bench.throughput import raw_parquet, realistic
from producer import Producer, Settings, wire
from producer.client import connect
from workers.app import make_app


def _backlog(producer: Producer, names: list[str], rows_per_table: int) -> None:
    for name in names:
        for start in range(0, rows_per_table, 10_000 * 16):
            producer.append_many(name, [realistic(s, 10_000) for s in
                                        range(start, min(rows_per_table, start + 160_000),
                                              10_000)])


def scale_out(workdir: str, url: str, rows_per_table: int, tables: int = 4,
              repeat: int = 3) -> list[dict]:
    """Rows/s of 1, 2 and 4 worker processes draining ``tables`` tables (best of ``repeat``),
    beside the same work done by pyarrow alone in as many processes: the machine's limit."""
    results = []
    names = [f"t{i}" for i in range(tables)]
    file_bytes = 32 * 2**20
    for processes in (1, 2, 4):
        lake = os.path.join(workdir, f"lake-{processes}")
        env = dict(os.environ, DELTAFLUSH_REDIS_URL=url, DELTAFLUSH_STORAGE_URI=lake,
                   DELTAFLUSH_MAX_FILE_BYTES=str(file_bytes), DELTAFLUSH_MAX_PENDING_BYTES="0",
                   # no size-triggered flushes while the backlog is built: the clock starts
                   # with the first flush_table
                   DELTAFLUSH_FLUSH_AT_BYTES=str(2**62))
        client = connect(url)
        settings = Settings.from_env(env)
        producer = Producer(settings=settings)
        proc = start_worker(env, Path(workdir) / f"worker-{processes}.log", processes)
        app = make_app(settings)
        best = float("inf")
        for _ in range(repeat):
            client.flushall()
            _backlog(producer, names, rows_per_table)
            started_ms = time.time() * 1000
            for name in names:
                app.send_task(wire.FLUSH_TASK, args=[name], queue=wire.QUEUE)
            while any(client.xlen(wire.Keys("deltaflush", n).delta)
                      or client.exists(wire.Keys("deltaflush", n).lease) for n in names):
                time.sleep(0.01)
            # to the last commit, as the workers recorded it (not to this loop's poll)
            last_ms = max(float(client.hget(wire.Keys("deltaflush", n).stats,
                                            "last_flush_ms") or 0) for n in names)
            best = min(best, (last_ms - started_ms) / 1000)
            shutil.rmtree(lake, ignore_errors=True)
        proc.terminate()
        proc.wait()
        app.close()
        producer.close()
        limit = _pyarrow_alone(rows_per_table, tables, processes, file_bytes, repeat,
                               os.path.join(workdir, "pyarrow-alone"))
        results.append({"processes": processes, "rows": rows_per_table * tables,
                        "seconds": round(best, 3),
                        "rows_s": round(rows_per_table * tables / best),
                        "limit_seconds": round(limit, 3),
                        "limit_rows_s": round(rows_per_table * tables / limit)})
    base, limit_base = results[0]["rows_s"], results[0]["limit_rows_s"]
    for r in results:
        r["speedup"] = round(r["rows_s"] / base, 2)
        r["limit_speedup"] = round(r["limit_rows_s"] / limit_base, 2)
        r["of_limit"] = round(r["rows_s"] / r["limit_rows_s"], 2)
    return results


def _pyarrow_alone(rows_per_table: int, tables: int, processes: int, file_bytes: int,
                   repeat: int, folder: str) -> float:
    """Seconds for ``processes`` processes to turn the same tables, as IPC payloads in
    memory, into Parquet files of ``file_bytes`` with pyarrow alone (no Redis, no Celery);
    best of ``repeat``."""
    payloads = [[bytes(wire.encode_table(realistic(s, 10_000)))
                 for s in range(0, rows_per_table, 10_000)] for _ in range(tables)]
    os.makedirs(folder, exist_ok=True)

    def work(mine: list[int], start: Any) -> None:
        start.wait()
        for t in mine:
            files, size = [[]], 0
            for payload in payloads[t]:
                if size >= file_bytes:
                    files.append([])
                    size = 0
                files[-1].append(payload)
                size += len(payload)
            for n, chunk in enumerate(files):
                raw_parquet(chunk, os.path.join(folder, f"t{t}-{n}.parquet"))

    best = float("inf")
    context = multiprocessing.get_context("fork")  # the payloads are shared, not copied
    for _ in range(repeat):
        start = context.Barrier(processes + 1)
        procs = [context.Process(target=work, args=(list(range(k, tables, processes)), start))
                 for k in range(processes)]
        for p in procs:
            p.start()
        start.wait()
        began = time.perf_counter()
        for p in procs:
            p.join()
        best = min(best, time.perf_counter() - began)
    shutil.rmtree(folder, ignore_errors=True)
    return best


def freshness(workdir: str, url: str, seconds: float, interval_s: float) -> dict:
    lake = os.path.join(workdir, "lake-fresh")
    env = dict(os.environ, DELTAFLUSH_REDIS_URL=url, DELTAFLUSH_STORAGE_URI=lake,
               DELTAFLUSH_FLUSH_INTERVAL_S=str(interval_s))
    connect(url).flushall()
    worker = start_worker(env, Path(workdir) / "worker-fresh.log", 2)
    with (Path(workdir) / "beat.log").open("wb") as out:
        beat = subprocess.Popen(CELERY + ["beat", "--loglevel=INFO"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    producer = Producer(settings=Settings.from_env(env))
    appended: dict[str, float] = {}
    landed: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        seen: set[str] = set()
        table_dir = Path(lake) / "fresh"
        while not done.is_set() or len(landed) < len(appended):
            for path in table_dir.glob("*.parquet") if table_dir.exists() else []:
                if path.name in seen:
                    continue
                seen.add(path.name)
                now = time.monotonic()
                md = pq.read_metadata(path).metadata
                first = wire.parse_id(md[b"deltaflush.first_id"])
                last = wire.parse_id(md[b"deltaflush.last_id"])
                for entry_id in list(appended):
                    if entry_id not in landed and first <= wire.parse_id(entry_id) <= last:
                        landed[entry_id] = now
            if done.is_set() and time.monotonic() - stop_at > interval_s * 3 + 30:
                return
            time.sleep(0.02)

    stop_at = float("inf")
    watcher = threading.Thread(target=watch)
    watcher.start()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        entry_id = producer.append("fresh", realistic(i * 1000, 1000))
        appended[entry_id] = time.monotonic()
        i += 1
        time.sleep(0.05)
    stop_at = time.monotonic()
    done.set()
    watcher.join()
    beat.terminate()
    worker.terminate()
    beat.wait()
    worker.wait()
    producer.close()
    delays = sorted(landed[e] - appended[e] for e in landed)
    pct = lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))], 3)  # noqa: E731
    return {"batches": len(appended), "landed": len(landed), "interval_s": interval_s,
            "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": round(delays[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows-per-table", type=int, default=500_000)
    parser.add_argument("--freshness-s", type=float, default=30, help="0: skip")
    parser.add_argument("--interval-s", type=float, default=2)
    args = parser.parse_args()
    with redis_server("deltaflush-fleet-") as (workdir, url):
        scale = scale_out(workdir, url, args.rows_per_table)
        fresh = freshness(workdir, url, args.freshness_s, args.interval_s) \
            if args.freshness_s > 0 else None
    print(f"machine: {json.dumps(machine())}\n")
    print("| worker processes | rows | seconds | rows/s | speed-up | pyarrow alone rows/s "
          "| its speed-up | deltaflush / pyarrow alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in scale:
        print(f"| {r['processes']} | {r['rows']} | {r['seconds']} | {r['rows_s']} "
              f"| {r['speedup']}x | {r['limit_rows_s']} | {r['limit_speedup']}x "
              f"| {r['of_limit']} |")
    if fresh is None:
        return
    print(f"\nfreshness under a steady load of 20 batches/s of 1,000 rows for "
          f"{args.freshness_s:g}s, flush interval {fresh['interval_s']:g}s:\n")
    print("| batches | landed | p50 | p99 | max |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {fresh['batches']} | {fresh['landed']} | {fresh['p50_s']}s | {fresh['p99_s']}s "
          f"| {fresh['max_s']}s |")


if __name__ == "__main__":
    main()
