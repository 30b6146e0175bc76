"""Small batches: what deltaflush does with event-at-a-time data (issue 16).

    python -m bench.small flush   [--sizes 1,10,100,1000,10000] [--entries 100000]
    python -m bench.small produce [--sizes 1,10,100,1000,10000] [--seconds 1]
    python -m bench.small linger  [--lingers 0,1,5,20] [--seconds 2]

* flush: a backlog of entries of N rows each, flushed by one in-process ``Flusher`` (entries/s
  and rows/s), against ``XRANGE`` of the same entries alone and pyarrow decoding the same
  payloads alone (one ``open_stream`` each), and against the flush decoding entry by entry
  (the fast path of ``workers.sources.runs`` off).
* produce: appends/s and rows/s by batch size for ``append`` (one call per batch),
  ``append_many`` (100 batches per call), the batcher (``Producer.batcher``, one ``write``
  per batch) and the asyncio producer (``AsyncProducer.append`` from 32 tasks, and its
  batcher).
* linger: one-row writes through the batcher at a fixed rate... no: as fast as one thread
  writes, for a few ``linger_ms``; the latency of a write (from ``write`` to its future's
  result) against throughput.

Rows have three columns (an int64 id, a short string, a float64), like the issue's. Starts
its own redis-server. Prints Markdown tables, the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import redis

from bench.common import machine, redis_server
from producer import Producer, Settings, wire
from producer.client import connect
from workers.flusher import Flusher
from workers.sources import runs
from workers.storage import Storage

TABLE = "small"


def rows_of(start: int, n: int) -> pa.Table:
    ids = range(start, start + n)
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "kind": pa.array(["click" if i % 3 else "view" for i in ids]),
                     "value": pa.array([i * 0.5 for i in ids], pa.float64())})


def row(i: int) -> dict[str, Any]:
    return {"id": i, "kind": "click" if i % 3 else "view", "value": i * 0.5}


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


# --- flush -------------------------------------------------------------------------------


def fill(client: redis.Redis, settings: Settings, payloads: list[bytes], rows: int) -> None:
    """The backlog as a producer leaves it (the first entry through ``append``, which
    stores the schema; the others with the same fields, by pipelined ``XADD``)."""
    client.flushall()
    with Producer(settings=settings) as producer:
        producer.append(TABLE, pa.ipc.open_stream(payloads[0]).read_all())
    keys = wire.Keys(settings.key_prefix, TABLE)
    for i in range(1, len(payloads), 1000):
        pipe = client.pipeline(transaction=False)
        for n, payload in enumerate(payloads[i:i + 1000], i):
            pipe.xadd(keys.delta, {wire.FIELD_ARROW: payload, wire.FIELD_ROWS: rows,
                                   wire.FIELD_BATCH: f"b{n}"})
        pipe.execute()


def xrange_alone(client: redis.Redis, key: str, count: int = 1024) -> None:
    """Read the stream whole, in chunks of ``count`` (the flusher's largest chunk)."""
    last = "-"
    while True:
        chunk = client.xrange(key, last, "+", count=count)
        if not chunk:
            return
        last = "(" + chunk[-1][0].decode()


def decode_alone(payloads: list[bytes]) -> None:
    for payload in payloads:
        pa.ipc.open_stream(payload).read_all()


def flush_sizes(url: str, workdir: str, sizes: list[int], entries: int, repeat: int
                ) -> list[dict[str, Any]]:
    client = connect(url)
    settings = Settings(redis_url=url, max_pending_bytes=0, max_file_bytes=2**40)
    out = []
    for size in sizes:
        count = max(20, min(entries, 2_000_000 // size))
        payloads = [bytes(wire.encode_table(rows_of(i * size, size))) for i in range(count)]
        fill(client, settings, payloads, size)
        delta = wire.Keys(settings.key_prefix, TABLE).delta
        t_xrange = best(lambda: xrange_alone(client, delta), repeat)  # noqa: B023
        t_decode = best(lambda: decode_alone(payloads), repeat)  # noqa: B023
        flushes = {}
        for mode in ("fast", "per_entry"):
            times = []
            for _ in range(repeat):
                fill(client, settings, payloads, size)
                lake = os.path.join(workdir, "lake")
                saved = runs.MIN_RUN
                runs.MIN_RUN = saved if mode == "fast" else 2**62
                try:
                    started = time.perf_counter()
                    result = Flusher(client, Storage(lake), settings).flush(TABLE)
                    times.append(time.perf_counter() - started)
                finally:
                    runs.MIN_RUN = saved
                assert result.rows == count * size and not result.dead, result
                shutil.rmtree(lake)
            flushes[mode] = min(times)
        out.append({
            "rows_per_entry": size, "entries": count,
            "flush_entries_s": round(count / flushes["fast"]),
            "flush_rows_s": round(count * size / flushes["fast"]),
            "per_entry_entries_s": round(count / flushes["per_entry"]),
            "xrange_entries_s": round(count / t_xrange),
            "decode_entries_s": round(count / t_decode),
            "of_xrange": round(t_xrange / flushes["fast"], 2),
        })
        print(json.dumps(out[-1]), flush=True)
    client.close()
    return out


def print_flush(results: list[dict[str, Any]]) -> None:
    print("| rows per entry | entries | flush entries/s | flush rows/s | entry by entry "
          "(fast path off) | XRANGE alone | pyarrow decode alone | flush / XRANGE |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rows_per_entry']:,} | {r['entries']:,} | {r['flush_entries_s']:,} "
              f"| {r['flush_rows_s']:,} | {r['per_entry_entries_s']:,} "
              f"| {r['xrange_entries_s']:,} | {r['decode_entries_s']:,} "
              f"| {r['of_xrange']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["flush", "produce", "linger"])
    parser.add_argument("--sizes", default="1,10,100,1000,10000")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with redis_server() as (workdir, url):
        if args.what == "flush":
            results = flush_sizes(url, workdir, sizes, args.entries, args.repeat)
            print_flush(results)
    print(f"\nmachine: {json.dumps(machine())}; load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
