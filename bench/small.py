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
* linger: one-row writes through the batcher for a few ``linger_ms``: the throughput of one
  thread writing as fast as it can, and the latency of a write (from ``write`` to its
  future's result: p50, p99) at a steady 20,000 writes/s.

Rows have three columns (an int64 id, a short string, a float64), like the issue's. Starts
its own redis-server. Prints Markdown tables, the machine and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import redis

from bench.common import machine, redis_server
from producer import AsyncProducer, Producer, Settings, wire
from producer.client import connect
from producer.errors import BufferFull
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


# --- produce ----------------------------------------------------------------------------


def timed(fn: Callable[[int], int], seconds: float) -> float:
    """Batches per second: ``fn(n)`` sends batches from number ``n`` on and returns how
    many it sent; called until ``seconds`` have passed."""
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds:
        sent += fn(sent)
    return sent / (time.perf_counter() - started)


def produce_sizes(url: str, sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    settings = Settings(redis_url=url, max_pending_bytes=0, flush_at_bytes=2**62)
    client = connect(url)
    out = []
    for size in sizes:
        pool = [rows_of(i * size, size) for i in range(max(1, 20_000 // size))]
        dicts = [row(i) for i in range(200_000)] if size == 1 else []
        r: dict[str, Any] = {"rows_per_batch": size}
        with Producer(settings=settings) as p:
            p.append(TABLE, pool[0])  # warm: registered, schema known

            def one(n: int, p: Producer = p, pool: list[pa.Table] = pool) -> int:
                p.append(TABLE, pool[n % len(pool)])
                return 1

            def many(n: int, p: Producer = p, pool: list[pa.Table] = pool) -> int:
                p.append_many(TABLE, [pool[(n + k) % len(pool)] for k in range(100)])
                return 100

            client.flushall()
            r["append"] = timed(one, seconds)
            client.flushall()
            r["append_many"] = timed(many, seconds)
            client.flushall()
            r["batcher"] = batcher_rate(p, pool, dicts, seconds)
        client.flushall()
        r["async_append"], r["async_batcher"] = asyncio.run(
            async_rates(settings, pool, dicts, seconds))
        out.append({k: (round(v) if isinstance(v, float) else v) for k, v in r.items()})
        print(json.dumps(out[-1]), flush=True)
        client.flushall()
    client.close()
    return out


def batcher_rate(p: Producer, pool: list[pa.Table], dicts: list[dict[str, Any]],
                 seconds: float) -> float:
    """Writes per second through ``p.batcher()`` (5 ms linger), counting until all are
    acknowledged: dict rows for one-row batches, else the tables."""
    items: list[Any] = dicts or pool
    with p.batcher(linger_ms=5) as b:
        write = b.write
        started = time.perf_counter()
        sent = 0
        while time.perf_counter() - started < seconds:
            futures = [write(TABLE, item) for item in items]
            sent += len(futures)
        b.flush()
        assert futures[-1].result()
        return sent / (time.perf_counter() - started)


async def async_rates(settings: Settings, pool: list[pa.Table], dicts: list[dict[str, Any]],
                      seconds: float) -> tuple[float, float]:
    """``AsyncProducer.append`` from 32 tasks, and its batcher (5 ms linger)."""
    async with AsyncProducer(settings=settings) as ap:
        await ap.append(TABLE, pool[0])
        sent = 0
        started = time.perf_counter()

        async def worker(k: int) -> None:
            nonlocal sent
            while time.perf_counter() - started < seconds:
                await ap.append(TABLE, pool[(sent + k) % len(pool)])
                sent += 1

        await asyncio.gather(*(worker(k) for k in range(32)))
        appends = sent / (time.perf_counter() - started)
        items: list[Any] = dicts or pool
        futures: list[asyncio.Future[str]] = []
        async with ap.batcher(linger_ms=5) as b:
            write = b.write
            started = time.perf_counter()
            sent = 0
            while time.perf_counter() - started < seconds:
                for item in items:
                    try:
                        futures.append(write(TABLE, item))
                    except BufferFull:  # an event loop cannot block: make room
                        await b.flush()
                        futures.append(write(TABLE, item))
                sent += len(items)
                await asyncio.sleep(0)  # let the batcher's task run
            await b.flush()
            assert futures[-1].result()
            writes = sent / (time.perf_counter() - started)
    return appends, writes


def print_produce(results: list[dict[str, Any]]) -> None:
    print("| rows per batch | append: batches/s (rows/s) | append_many, 100 per call "
          "| batcher, one write per batch | AsyncProducer.append, 32 tasks "
          "| async batcher |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        n = r["rows_per_batch"]
        cells = [f"{r[k]:,} ({r[k] * n:,})" for k in
                 ("append", "append_many", "batcher", "async_append", "async_batcher")]
        print(f"| {n:,} | " + " | ".join(cells) + " |")


# --- linger ------------------------------------------------------------------------------


def linger_tradeoff(url: str, lingers: list[float], seconds: float) -> list[dict[str, Any]]:
    settings = Settings(redis_url=url, max_pending_bytes=0, flush_at_bytes=2**62)
    client = connect(url)
    dicts = [row(i) for i in range(200_000)]
    out = []
    with Producer(settings=settings) as p:
        p.append(TABLE, [dicts[0]])
        for linger in lingers:
            client.flushall()
            throughput = batcher_rate_linger(p, dicts, linger, seconds)
            entries = client.xlen(wire.Keys(settings.key_prefix, TABLE).delta)
            client.flushall()
            latencies = paced_latencies(p, dicts, linger, 20_000, seconds)
            out.append({"linger_ms": linger, "writes_s": round(throughput),
                        "rows_per_entry": round(throughput * seconds / max(1, entries)),
                        "p50_ms": round(statistics.median(latencies) * 1000, 2),
                        "p99_ms": round(statistics.quantiles(latencies, n=100)[98] * 1000, 2)})
            print(json.dumps(out[-1]), flush=True)
    client.close()
    return out


def batcher_rate_linger(p: Producer, dicts: list[dict[str, Any]], linger: float,
                        seconds: float) -> float:
    with p.batcher(linger_ms=linger) as b:
        write = b.write
        started = time.perf_counter()
        sent = 0
        while time.perf_counter() - started < seconds:
            for item in dicts[:10_000]:
                write(TABLE, item)
            sent += 10_000
        b.flush()
        return sent / (time.perf_counter() - started)


def paced_latencies(p: Producer, dicts: list[dict[str, Any]], linger: float, rate: int,
                    seconds: float) -> list[float]:
    """Write at ``rate`` writes/s (in steps of 1 ms) for ``seconds``; each write's latency
    from ``write`` to its future's result."""
    latencies: list[float] = []
    with p.batcher(linger_ms=linger) as b:
        started = time.perf_counter()
        per_ms = max(1, rate // 1000)
        n = 0
        while (now := time.perf_counter()) - started < seconds:
            for _ in range(per_ms):
                t0 = time.perf_counter()
                b.write(TABLE, dicts[n % len(dicts)]).add_done_callback(
                    lambda _, t0=t0: latencies.append(time.perf_counter() - t0))
                n += 1
            pause = started + n / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            del now
    return latencies


def print_linger(results: list[dict[str, Any]]) -> None:
    print("| linger_ms | writes/s, one thread | rows per entry | latency p50 at 20,000 "
          "writes/s | p99 |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['linger_ms']} | {r['writes_s']:,} | {r['rows_per_entry']:,} "
              f"| {r['p50_ms']} ms | {r['p99_ms']} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["flush", "produce", "linger"])
    parser.add_argument("--sizes", default="1,10,100,1000,10000")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--lingers", default="0,1,5,20")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with redis_server() as (workdir, url):
        if args.what == "flush":
            results = flush_sizes(url, workdir, sizes, args.entries, args.repeat)
            print_flush(results)
        elif args.what == "produce":
            print_produce(produce_sizes(url, sizes, args.seconds))
        else:
            print_linger(linger_tradeoff(url, [float(x) for x in args.lingers.split(",")],
                                         args.seconds))
    print(f"\nmachine: {json.dumps(machine())}; load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
