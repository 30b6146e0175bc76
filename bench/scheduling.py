"""Cost of one scheduling round with many registered tables, few of them with data.

    python -m bench.scheduling [--tables 10000] [--with-data 100]
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import machine, redis_server
from producer import Producer, Settings, wire
from producer.client import connect
from workers.scheduler import due_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tables", type=int, default=10_000)
    parser.add_argument("--with-data", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with redis_server() as (_, url):
        client = connect(url)
        pipe = client.pipeline(transaction=False)
        for i in range(args.tables):
            pipe.sadd(wire.tables_key("deltaflush"), f"t{i}")
        pipe.execute()
        p = Producer(settings=Settings(redis_url=url))
        step = max(1, args.tables // max(1, args.with_data))
        busy = [f"t{i}" for i in range(0, args.tables, step)][: args.with_data]
        for name in busy:
            p.append(name, [{"id": 1}])
        best = float("inf")
        for _ in range(args.repeat):
            for name in busy:
                client.delete(wire.Keys("deltaflush", name).queued)
            started = time.perf_counter()
            due = due_tables(client, "deltaflush", 30_000)
            best = min(best, time.perf_counter() - started)
            assert len(due) == len(busy), (len(due), len(busy))
        print(f"machine: {json.dumps(machine())}")
        print(f"| tables | with data | one round (best of {args.repeat}) |")
        print("| --- | --- | --- |")
        print(f"| {args.tables} | {len(busy)} | {best * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
