"""A/B of one tuning constant of the flush: alternating rounds, each value against pyarrow
alone on the same data, so that a few percent stand out of this machine's noise.

    python -m bench.ab workers.writer.FIRST_ROW_GROUP_FRACTION 8,12,16 [--rounds 10]
    python -m bench.ab workers.sources.redis_stream.FIRST_CHUNK_ENTRIES 16,2

Each round writes the payloads once with pyarrow alone, then, for each value, appends the
backlog again and flushes it with the constant set to that value. Prints the flush ratio
(pyarrow alone / flush) from the best and from the median times. Starts its own
redis-server. The numbers of the tuning changes in docs/performance.md come from this.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import statistics
import time

from bench.common import machine, redis_server
from bench.throughput import raw_parquet, realistic
from producer import Producer, Settings, wire
from producer.client import connect
from workers.flusher import Flusher
from workers.storage import Storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("constant", help="module.NAME, e.g. workers.writer.RAMP")
    parser.add_argument("values", help="comma-separated Python literals")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    module_name, _, name = args.constant.rpartition(".")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        parser.error(f"{module_name} has no {name}")
    values = [ast.literal_eval(v) for v in args.values.split(",")]
    original = getattr(module, name)
    with redis_server("deltaflush-ab-") as (workdir, url):
        client = connect(url)
        settings = Settings(redis_url=url, max_pending_bytes=0, max_file_bytes=2**40)
        tables = [realistic(i, 10_000) for i in range(0, args.rows, 10_000)]
        payloads = [bytes(wire.encode_table(t)) for t in tables]
        producer = Producer(settings=settings)
        raw: list[float] = []
        flush: dict[object, list[float]] = {v: [] for v in values}
        try:
            for r in range(args.rounds):
                raw.append(raw_parquet(payloads, os.path.join(workdir, "raw.parquet")))
                for v in values:
                    client.flushall()
                    for i in range(0, len(tables), 64):
                        producer.append_many("ab", tables[i:i + 64])
                    setattr(module, name, v)
                    started = time.perf_counter()
                    Flusher(client, Storage(os.path.join(workdir, f"lake-{r}-{v}")),
                            settings).flush("ab")
                    flush[v].append(time.perf_counter() - started)
                    setattr(module, name, original)
        finally:
            setattr(module, name, original)
            producer.close()
    print(f"machine: {machine()}; {args.rows} rows, {args.rounds} alternating rounds\n")
    print(f"| {name} | flush ratio, best | flush ratio, median |")
    print("| --- | --- | --- |")
    for v, times in flush.items():
        print(f"| {v!r} | {min(raw) / min(times):.3f} "
              f"| {statistics.median(raw) / statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
